"""The exactness checks of the test suite, on CUDA tensors, for `bash bench/gpu.sh`.

One GPU cannot host two NCCL ranks, so two processes share GPU 0 over gloo (both see LOCAL_RANK=0): what is
checked is that the CUDA code paths (grouped expert GEMM, the dispatcher's index arithmetic, the pipeline executor's
buffers) compute what the CPU float64 reference computes, not NCCL itself. Checks:
  ep2       one MoE layer under expert parallelism (ep=2, fp32 on CUDA) vs the full layer in one process
  pipeline  a DualPipe step (pp=2, float64 on CUDA) vs one process: loss and every parameter's gradient
Prints a markdown table; exit 1 if a check fails. `--smoke` runs the same on CPU to check the script.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def rel(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ep2_check(mesh) -> float:
    from framework.config import ModelConfig
    from framework.models.deepseek_v3.moe import MoE
    from framework.models.expert_parallel import apply_expert_parallel

    dev = mesh.device
    cfg = ModelConfig(name="deepseek_v3", vocab_size=64, hidden_size=64, moe_intermediate_size=32,
                      n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)
    torch.manual_seed(0)
    ref = MoE(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ref = ref.to(dev)
    moe = apply_expert_parallel(copy.deepcopy(ref), mesh)
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, n, 64, generator=g).to(dev) for n in (9, 5)]
    X = torch.cat(xs, dim=1)
    Y = ref(X)
    y = moe(xs[mesh.ep_rank])
    lo = 0 if mesh.ep_rank == 0 else 9
    return rel(y, Y[:, lo:lo + y.shape[1]])


def pipeline_check(mesh) -> float:
    from framework.models import build_model
    from framework.parallelize import pipeline_step
    from tests.framework.test_pipeline_step import compose_cfg, model_overrides

    cfg = compose_cfg(*model_overrides("deepseek_v3"), "parallel.pp=2", "parallel.dp=1", "parallel.schedule=dualpipe",
                      "train.micro_batches=4", "train.global_batch_size=8")
    g = torch.Generator().manual_seed(123)
    batches = [(torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g))
               for _ in range(4)]
    torch.manual_seed(0)
    ref_model = build_model(cfg.model).double()
    for x, y in batches:
        loss, _ = ref_model.compute_loss(x, y)
        (loss / 4).backward()
    ref = {n: p.grad for n, p in ref_model.named_parameters()}
    torch.manual_seed(0)
    model = build_model(cfg.model).double().to(mesh.device)
    step = pipeline_step(model, cfg, mesh)
    step.forward_backward([(x.to(mesh.device), y.to(mesh.device)) for x, y in batches])
    return max(rel(p.grad, ref[n]) for n, p in step.named_parameters() if p.grad is not None)


def worker(rank: int, world: int, ports: list, device: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")  # every rank on GPU 0
    from parallel.mesh import init_mesh

    res = {}
    checks = (("ep2", (1, 2, 2), ep2_check), ("pipeline", (2, 1, 1), pipeline_check))
    for port, (name, (pp, dp, ep), fn) in zip(ports, checks):
        os.environ["MASTER_PORT"] = str(port)  # a fresh store per process group
        try:
            mesh = init_mesh(pp, dp, ep, device, "gloo")
            res[name] = fn(mesh)
        except Exception:
            res[name] = traceback.format_exc().strip().splitlines()[-1]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def main() -> int:
    smoke = "--smoke" in sys.argv[1:]
    if not smoke and not torch.cuda.is_available():
        print("gpu_equal: needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    from parallel.mesh import free_port

    device = "cpu" if smoke else "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, [free_port(), free_port()], device, tmp), nprocs=2, join=True)
        res = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    # fp32 EP: reductions in another order, 1e-6 relative; float64 pipeline: 1e-10 (as the CPU tests)
    tol = {"ep2": 1e-6, "pipeline": 1e-10}
    ok = True
    print(f"| equality on {device} tensors, 2 processes over gloo | rank 0 rel. error | rank 1 | bound | |")
    print("|---|---|---|---|---|")
    for name, bound in tol.items():
        vals = [r[name] for r in res]
        good = all(isinstance(v, float) and v <= bound for v in vals)
        ok &= good
        cells = [f"{v:.2e}" if isinstance(v, float) else f"error: {v}" for v in vals]
        print(f"| {name} | {cells[0]} | {cells[1]} | {bound:g} | {'ok' if good else 'FAILED'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
