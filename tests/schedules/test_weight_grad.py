"""Deferred weight gradients: SplitLinear's land in the parameters, also inside activation checkpointing; and under
DualPipe the weight-gradient work of the tiny DeepSeek-V3 with MoE, FP8 and MTP runs in W (per layer kind:
tests/framework/test_weight_grad.py)."""
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from schedules.weight_grad import SplitLinear, WeightGradStore
from tests.conftest import compose_cfg


def test_deferred_grad_under_checkpoint_matches_linear():
    torch.manual_seed(0)
    lin, ref = SplitLinear(8, 4).double(), torch.nn.Linear(8, 4).double()
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        checkpoint(lin, x, use_reentrant=False).pow(2).sum().backward()
        WeightGradStore.flush()
    finally:
        WeightGradStore.enabled = False
    assert lin.weight.grad is None  # deferred: nothing written until W
    gx = x.grad.clone()
    WeightGradStore.pop()
    x.grad = None
    ref(x).pow(2).sum().backward()
    assert torch.equal(gx, x.grad)
    assert torch.allclose(lin.weight.grad, ref.weight.grad, rtol=0, atol=1e-14)
    assert torch.allclose(lin.bias.grad, ref.bias.grad, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------ zero bubble
# DualPipe and DualPipeV on 2 ranks with the tiny DeepSeek-V3 (MoE, FP8 blockwise, one MTP depth): where does the
# weight-gradient work of the split backwards (B, and the backward half of an F&B pair that leaves W for later) run? Every GEMM of the step is counted (mm, addmm, bmm, baddbmm, _grouped_mm: 2 FLOPs per multiply-add) and
# attributed to the action running it and, when it runs inside a layer's weight-gradient computation (the closure a
# layer gives framework.weight_grad.weight_grads, whether it runs at once or in W), to weight-gradient work. A
# weight gradient computed outside that mechanism would show as a .grad written during a split B: those are listed.
_aten = torch.ops.aten
_GEMMS = (_aten.mm.default, _aten.bmm.default, _aten.addmm.default, _aten.baddbmm.default, _aten._grouped_mm.default)


def _gemm_flops(func, args) -> int:
    if func not in _GEMMS:
        return 0
    a, b = args[0], args[1]
    if func in (_aten.mm.default, _aten.bmm.default):
        return 2 * a.numel() * b.shape[-1]
    if func in (_aten.addmm.default, _aten.baddbmm.default):
        return 2 * b.numel() * args[2].shape[-1]
    if func is _aten._grouped_mm.default:   # [M, K] x [E, K, N] or [K, M] x [M, N] (groups along M): 2 M K N
        return 2 * a.numel() * b.shape[-1]
    return 0


class WorkCounter(TorchDispatchMode):
    """GEMM FLOPs per (action kind, 'wgrad' | 'other')."""

    def __init__(self):
        super().__init__()
        self.flops: dict = {}
        self.action = "none"
        self.in_wgrad = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = _gemm_flops(func, args)
        if n:
            key = (self.action, "wgrad" if self.in_wgrad else "other")
            self.flops[key] = self.flops.get(key, 0) + n
        return func(*args, **(kwargs or {}))


def _instrument(counter: WorkCounter):
    """Count every layer's weight-gradient computation as such; the executor's actions by kind (a split B and the
    backward half of a split F&B are 'B'; BW and full F&B are 'BW'). Returns the list of (action, parameter) whose
    .grad a split B wrote."""
    import framework.weight_grad as wg
    from schedules.executor import PipelineExecutor

    original = wg.weight_grads

    def weight_grads(ctx, weights, compute):
        def counted():
            counter.in_wgrad += 1
            try:
                return compute()
            finally:
                counter.in_wgrad -= 1
        return original(ctx, weights, counted)

    for module in list(sys.modules.values()):   # every module that imported the function by name
        if getattr(module, "weight_grads", None) is original:
            module.weight_grads = weight_grads
    written = {"B": [], "W": []}

    def wrap(op):
        run = getattr(PipelineExecutor, "_do_" + op)

        def do(self, a):
            kind = {"FB": "BW" if a.full else "B"}.get(op, op)
            before = {id(p): (id(p.grad), p.grad._version) for m in self.stage_modules.values()
                      for p in m.parameters() if p.grad is not None}
            counter.action = kind
            try:
                run(self, a)
            finally:
                counter.action = "none"
            if kind in written:
                for s, m in self.stage_modules.items():
                    for name, p in m.named_parameters():
                        if p.grad is not None and before.get(id(p)) != (id(p.grad), p.grad._version):
                            written[kind].append((str(a), name, p.numel()))
        setattr(PipelineExecutor, "_do_" + op, do)

    for op in ("F", "B", "W", "BW", "FB"):
        wrap(op)
    return written


ZB_SCHEDULES = ("dualpipe", "dualpipev")


def zb_overrides(schedule: str = "dualpipe") -> list[str]:
    return ["model=deepseek_v3_tiny", "data.vocab_size=300", "train.seq_len=16", "model.max_position_embeddings=32",
            "model.num_hidden_layers=4", "model.first_k_dense_replace=1", "model.num_nextn_predict_layers=1",
            "model.expert_impl=grouped", "parallel.pp=2", f"parallel.schedule={schedule}", "train.micro_batches=8",
            "train.global_batch_size=16", "fp8.enabled=true", "fp8.backend=torch"]


def fp8_model(cfg):
    from framework.fp8 import convert_to_fp8
    from framework.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    convert_to_fp8(model, exclude=list(cfg.fp8.exclude), backend="torch")
    return model


def zb_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        import logging

        from framework.parallelize import pipeline_step
        from parallel.mesh import init_mesh

        mesh = init_mesh(2, 1, 1, "cpu")
        cfg = compose_cfg(*zb_overrides())
        n = cfg.train.micro_batches
        g = torch.Generator().manual_seed(5)
        batches = [(torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g))
                   for _ in range(n)]
        records: list = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logging.getLogger("duet").addHandler(Keep())
        counter = WorkCounter()
        written = _instrument(counter)
        runs = {}
        for schedule in ZB_SCHEDULES:
            step = pipeline_step(fp8_model(cfg), compose_cfg(*zb_overrides(schedule)), mesh)
            counter.flops = {}
            written["B"].clear()
            written["W"].clear()
            with counter:
                res = step.forward_backward(batches)
                loss_sum, count = res.loss_sum, res.count
            # numpy arrays travel by value (a tensor would be passed as shared memory the exiting process takes along)
            runs[schedule] = {"flops": dict(counter.flops), "written_in_b": list(written["B"]),
                              "written_in_w": list(written["W"]), "loss": (loss_sum, count),
                              "grads": {name: p.grad.numpy().copy() for name, p in step.named_parameters()}}

        # a user's expert GEMMs that say nothing about their weight gradient: one line names the layer
        class PlainGemms:
            def __call__(self, x, counts, weight, proj):
                return x

        quiet = len(records)
        other = fp8_model(cfg)
        other.layers[2].mlp.experts.linear_fn = PlainGemms()
        pipeline_step(other, cfg, mesh)
        out.put((rank, {"runs": runs, "quiet": quiet, "warnings": records[quiet:]}))
    except BaseException:
        out.put((rank, {"error": traceback.format_exc()}))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def reference(cfg):
    """One process, the same micro-batches: mean loss, the gradient of the mean loss, and per element the sum of
    |contribution| over every term the gradient sums: each micro-batch's each use of the weight (one deferred
    closure each), the scale of the rounding by which a reordered sum may differ."""
    from schedules.weight_grad import enable_weight_grad_split

    model = fp8_model(cfg)
    enable_weight_grad_split(model)
    names = {id(p): name for name, p in model.named_parameters()}
    n = cfg.train.micro_batches
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g))
               for _ in range(n)]
    total, grads, scale = 0.0, {}, {}
    for x, y in batches:
        WeightGradStore.clear()
        WeightGradStore.enabled = True
        try:
            loss, _ = model.compute_loss(x, y)
            (loss / n).backward()
        finally:
            WeightGradStore.enabled = False
        total += loss.item()
        for f in WeightGradStore.take_cache():
            for p in f.params:
                p.grad = None
            f()
            for p in f.params:
                name = names[id(p)]
                grads[name] = grads.get(name, 0) + p.grad
                scale[name] = scale.get(name, 0) + p.grad.abs()
                p.grad = None
    return total / n, grads, scale


def test_dualpipe_runs_weight_gradients_in_w_fp8_moe_mtp():
    from parallel.mesh import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=zb_worker, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    errors = [r["error"] for r in results.values() if "error" in r]
    assert not errors, "\n".join(errors)

    for rank, r in sorted(results.items()):
        assert r["quiet"] == 0                                # every layer defers: nothing logged
        assert len(r["warnings"]) == 1 and "layers.2.mlp.experts (Experts)" in r["warnings"][0], r["warnings"]

    # pipeline vs one process, FP8: each micro-batch's contribution is computed by the same operations in both (the
    # 1x128 tiles run along one micro-batch's tokens, the weights are the same), so only the order in which the
    # contributions of the micro-batches (and of the embedding's and head's two uses) are summed differs: two sums
    # of at most 2n fp32 terms, each within 2n * 2^-24 * sum |contribution| of the exact one, per element
    cfg = compose_cfg(*zb_overrides())
    n = cfg.train.micro_batches
    ref_loss, ref, scale = reference(cfg)
    for schedule in ZB_SCHEDULES:
        runs = {rank: r["runs"][schedule] for rank, r in results.items()}
        for rank, r in sorted(runs.items()):
            f = r["flops"]
            in_w, in_b = f.get(("W", "wgrad"), 0), f.get(("B", "wgrad"), 0)
            w_params = {name: numel for _, name, numel in r["written_in_w"]}
            print(f"{schedule} rank {rank}: weight-gradient GEMM FLOPs in W {in_w:.4g}, in split B {in_b:.4g} "
                  f"({in_w / (in_w + in_b):.2%} in W); input-gradient FLOPs in split B {f.get(('B', 'other'), 0):.4g}; "
                  f"weight-gradient FLOPs in full backwards (BW, F&B) {f.get(('BW', 'wgrad'), 0):.4g}; "
                  f"parameters written in W {len(w_params)} ({sum(w_params.values())} elements), in split B "
                  f"{len(r['written_in_b'])}")
            assert in_w > 0 and in_w >= 0.95 * (in_w + in_b)
            assert r["written_in_b"] == []                       # no weight gradient escaped the mechanism
            assert f.get(("W", "other"), 0) == 0                  # W runs weight-gradient work only
            assert f.get(("B", "other"), 0) > 0                   # and B really ran (input gradients)
        # each rank holds the last stage of one direction (DualPipe) or of the V (DualPipeV, rank 0)
        loss = sum(r["loss"][0] for r in runs.values()) / sum(r["loss"][1] for r in runs.values())
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (schedule, loss, ref_loss)
        worst, checked = 0.0, 0
        for r in runs.values():
            for name, g in r["grads"].items():
                g = torch.from_numpy(g)
                bound = 2 * (2 * n * 2.0 ** -24 * scale[name]) + 1e-30
                excess = ((g - ref[name]).abs() / bound).max().item()
                worst = max(worst, excess)
                checked += 1
                assert excess <= 1, (schedule, name, excess)
        print(f"{schedule} vs one process (FP8): {checked} gradients, worst error {worst:.3g} of the rounding bound")


def test_mirror_waits_for_the_embedding_write_of_the_last_part(monkeypatch):
    """DualPipe rank 0 holds the first part (which registers the embedding) and the last part (whose MTP depth
    writes the embedding's gradient too, in its own W): the bucket holding the embedding starts only once both
    stages reported it final, and the executor's per-W report names the embedding for the last stage."""
    from framework.models import build_model
    from schedules import get_layout
    from schedules.mirror import MirrorExchange, _Bucket, used_parameters
    from schedules.stage import split_model

    cfg = compose_cfg("model=deepseek_v3_tiny", "data.vocab_size=300", "model.hidden_size=16",
                      "model.num_hidden_layers=2", "model.moe_intermediate_size=8", "model.intermediate_size=24")
    model = build_model(cfg.model)
    layout = get_layout("dualpipe", 2)
    parts = split_model(model, layout.num_parts)
    stages = {s: parts[layout.stage_to_part[s]] for s in layout.stages_of(0)}   # {0: first part, 3: last part}
    first, last = stages[0], stages[3]
    embed = model.embed.weight
    assert all(p is not embed for p in last.parameters())                      # not registered by the last part
    assert any(p is embed for p in used_parameters(last))                       # but written by it
    started = []
    monkeypatch.setattr(_Bucket, "start", lambda self: started.append(self))
    exchange = MirrorExchange(stages, layout, {0: None, 1: None}, bucket_elems=1)   # one bucket per parameter
    exchange.stage_done(0)                                                      # the first part's last W is done
    assert not any(any(p is embed for p in b.params) for b in started)
    exchange.stage_done(3, [p for p in used_parameters(last) if p is not embed])
    assert not any(any(p is embed for p in b.params) for b in started)
    exchange.stage_done(3, [embed])                                             # the last part's W wrote it
    assert any(any(p is embed for p in b.params) for b in started)
