"""Overlapped F&B pairs (schedules/overlap.py) against sequential forward-then-backward and against one process.

One process: recomputation (RMSNorm, SwiGLU products) gives the plain model's losses and gradients bitwise, really
recomputes those pieces in backward, and composes with weight gradients deferred to W.

One spawned group of 4 ranks (pp=2 x dp=2, ep=2: the experts of each pipeline rank are split over its two
data-parallel ranks) runs every distributed check; each rank returns numbers that the tests below assert on:
- an F&B pair of the tiny DeepSeek-V3 split in two parts (forward of one chunk on one part, backward of another
  chunk on the other part, both pairings) equals the forward then the backward run the plain way, with the
  expert all-to-alls blocking inside autograd: float64 within 1e-12, fp32 within 1e-6 relative, recomputation on
  and off, with a balance loss and an MTP depth; and bitwise, forward values and gradients alike;
- within the pair the exchanges really alternate (a forward exchange starts between two backward ones);
- the same with the padded dispatch layout (no count exchange), against the plain run with the counts layout;
- DualPipe with overlap (either dispatch layout), and DualPipeV with overlap and recomputation, through PipelineStep
  equal the single-process float64 reference: mean loss within 1e-12, every gradient within 1e-10 (expert gradients: the
  slice of the experts a rank holds).
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_cfg


TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def tiny_overrides(**extra) -> list[str]:
    over = {"model": "deepseek_v3_tiny", "data.vocab_size": 300, "train.seq_len": 8,
            "model.max_position_embeddings": 16, "model.hidden_size": 16, "model.num_hidden_layers": 4,
            "model.moe_intermediate_size": 8, "model.first_k_dense_replace": 1, "model.intermediate_size": 24,
            "model.expert_impl": "loop"}
    over.update(extra)
    return [f"{k}={v}" for k, v in over.items()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    ref = b.norm()
    return float((a - b).norm() / ref) if ref > 0 else float((a - b).norm())


def build(cfg, dtype, mesh=None):
    from framework.models import build_model
    from framework.models.expert_parallel import apply_expert_parallel

    torch.manual_seed(0)
    model = build_model(cfg.model).to(dtype)
    if mesh is not None:
        apply_expert_parallel(model, mesh, layout=cfg.parallel.comm.dispatch)
    return model


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------- one F&B pair
def fb_pair(cfg, dtype, mesh, mode: str, recompute: bool, pairing: int, data) -> dict:
    """Chunk b runs forward through both parts; then one F&B pair: pairing 0 = forward of chunk a on part 0 with
    the backward of chunk b on part 1 (from its loss); pairing 1 = forward of chunk a on part 1 (to its loss) with
    the backward of chunk b on part 0 (from its output gradient). The remaining backwards finish the step.

    mode: plain (no sub-stages, the exchanges blocking inside autograd: the reference) or fb (the overlap hook)."""
    from parallel import exchanges
    from schedules.stage import ModelPart, split_model

    model = build(cfg, dtype, mesh)
    parts = split_model(model, 2)
    for p in parts:
        p.overlap, p.recompute, p.loss_scale = mode != "plain", recompute, 0.5
    xa, ya, xb, yb = data
    # chunk b: part 0, then part 1 to its loss
    hb = parts[0](xb)
    hb_in = hb.detach().requires_grad_()
    loss_b = parts[1](hb_in, xb, yb)
    ha_in = None
    if pairing == 0:
        args = ([xa], None, [], parts[1], loss_b, [], [])
    else:
        loss_b.backward()  # part 1 of chunk b first, so part 0 of chunk b has its output gradient
        ha = parts[0](xa)
        ha_in = ha.detach().requires_grad_()
        args = ([ha_in, xa, ya], (lambda loss: loss), [], parts[0], None, [hb], [hb_in.grad])
    module0 = parts[pairing]
    exchanges.TRACE.clear()  # the exchanges of the pair only
    if mode == "fb":
        outputs0, loss0 = ModelPart.overlapped_forward_backward(module0, *args)
        out0 = outputs0[0]
    else:
        out0 = module0(*args[0])
        if pairing == 0:
            loss_b.backward()
        else:
            torch.autograd.backward([hb], [hb_in.grad])
    order = [r.name for r in sorted(exchanges.TRACE.records, key=lambda r: r.start)]
    # finish the step: the other half of each chunk
    if pairing == 0:
        torch.autograd.backward([out0, hb], [torch.ones_like(out0), hb_in.grad])
    else:
        out0.backward()
        torch.autograd.backward([ha], [ha_in.grad])
    return {"out": out0.detach(), "loss_b": loss_b.detach(), "grads": grads_of(model), "order": order,
            "metrics": [dict(m) for p in parts for m in p.metrics]}


def interleaved(order: list[str]) -> bool:
    """A forward exchange started after one backward exchange and before another."""
    back = [i for i, n in enumerate(order) if n.endswith(".backward")]
    fwd = [i for i, n in enumerate(order) if n.endswith((".dispatch", ".combine"))]
    return any(back[0] < i < back[-1] for i in fwd) if back else False


def fb_checks(mesh) -> dict:
    g = torch.Generator().manual_seed(100 + mesh.rank)  # every ep rank has its own tokens
    data = tuple(torch.randint(0, 300, (2, 8), generator=g) for _ in range(4))
    out = {"err": {}, "bitwise_forward": {}, "interleaved": {}, "not_bitwise": {}}
    # float64 with the per-expert loop, fp32 with the grouped GEMM (recomputed under a checkpoint policy)
    # the padded dispatch layout (no count exchange) against the same plain reference with the counts layout
    for dtype, impl, variants in ((torch.float64, "loop", ((False, "counts"), (True, "counts"))),
                                  (torch.float32, "grouped", ((True, "counts"), (False, "padded")))):
        over = {"model.expert_impl": impl, "model.seq_aux_loss_alpha": 0.01, "model.num_nextn_predict_layers": 1}
        cfg = compose_cfg(*tiny_overrides(**over))
        for pairing in (0, 1):
            ref = fb_pair(cfg, dtype, mesh, "plain", False, pairing, data)
            for recompute, layout in variants:
                got = fb_pair(compose_cfg(*tiny_overrides(**over, **{"parallel.comm.dispatch": layout})), dtype,
                              mesh, "fb", recompute, pairing, data)
                key = f"{dtype}/{pairing}/rc={recompute}/{layout}"
                assert got["grads"].keys() == ref["grads"].keys(), key
                out["err"][key] = max([rel(got["grads"][n], ref["grads"][n]) for n in ref["grads"]]
                                      + [rel(got["out"], ref["out"]), rel(got["loss_b"], ref["loss_b"])])
                out["bitwise_forward"][key] = (torch.equal(got["out"], ref["out"])
                                               and torch.equal(got["loss_b"], ref["loss_b"])
                                               and got["metrics"] == ref["metrics"])
                out["not_bitwise"][key] = [n for n in ref["grads"] if not torch.equal(got["grads"][n], ref["grads"][n])]
                out["interleaved"][key] = interleaved(got["order"])
            out["interleaved"][f"{dtype}/{pairing}/plain"] = interleaved(ref["order"])
    return out


# ------------------------------------------------------------------------------------------- DualPipe step
def dualpipe_checks(mesh) -> dict:
    import torch.distributed as dist

    from framework.parallelize import pipeline_step
    from parallel.expert import local_expert_range
    from tests.framework.test_pipeline_step import reference_grads

    from schedules.overlap import exchanges_async

    n = 2 * mesh.pp * 2                                   # DualPipe: even, >= 2 * pp
    common = [*tiny_overrides(), "parallel.pp=2", "parallel.dp=2", "parallel.ep=2", f"train.micro_batches={n}",
              f"train.global_batch_size={2 * n * mesh.dp}"]
    g = torch.Generator().manual_seed(123)
    world = [(torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g))
             for _ in range(n * mesh.dp)]
    mine = world[mesh.dp_rank * n:(mesh.dp_rank + 1) * n]
    ref_loss, ref = reference_grads(compose_cfg(*common), None, world)
    out = {}
    # DualPipe (2 parts of 2 layers, each on both ranks) and DualPipeV (4 parts of 1 layer, a V over the 2 ranks)
    for label, schedule, recompute, layout in (("dualpipe, overlap", "dualpipe", False, "counts"),
                                               ("dualpipe, overlap, padded dispatch", "dualpipe", False, "padded"),
                                               ("dualpipev, overlap + recompute", "dualpipev", True, "counts")):
        cfg = compose_cfg(*common, f"parallel.schedule={schedule}", f"parallel.comm.dispatch={layout}")
        local = local_expert_range(cfg.model.n_routed_experts, mesh.ep, mesh.ep_rank)
        model = build(cfg, torch.float64, mesh)
        step = pipeline_step(model, cfg, mesh)
        for part in step.stages.values():
            part.recompute = recompute
        # every part holding an expert-parallel layer runs as sub-stages (and every part when recomputing)
        uses = [part.uses_steps() for part in step.stages.values()
                if recompute or any(exchanges_async(m) for m in part.layers.modules())]
        res = step.forward_backward(mine)
        loss_sum, count = res.loss_sum, res.count
        t = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
        dist.all_reduce(t)
        errs = {}
        for name, p in step.named_parameters():
            r = ref[name][local.start:local.stop] if getattr(p, "_duet_expert", False) else ref[name]
            errs[name] = float((p.grad - r).abs().max() / r.abs().max().clamp_min(1e-30))
        out[label] = {"loss_err": abs(float(t[0] / t[1]) - ref_loss) / abs(ref_loss), "grad_errs": errs,
                      "uses_steps": uses}
        dist.barrier()
    return out


def four_rank_checks(rank: int) -> dict:
    from parallel.mesh import init_mesh

    mesh = init_mesh(2, 2, 2, "cpu")
    return {"fb": fb_checks(mesh), "dualpipe": dualpipe_checks(mesh)}


def results() -> list[dict]:
    from tests.parallel.test_mesh import spawn_ranks

    return spawn_ranks(4, "tests.schedules.test_overlap:four_rank_checks")


# ------------------------------------------------------------------------------------------- tests (4 ranks)
def test_fb_pair_equals_forward_then_backward():
    for rank, res in enumerate(results()):
        for key, err in res["fb"]["err"].items():
            tol = TOL[torch.float64 if key.startswith("torch.float64") else torch.float32]
            assert err <= tol, (rank, key, err)
            assert res["fb"]["bitwise_forward"][key], (rank, key, "forward values must be bitwise equal")
            # cutting at the exchanges keeps autograd's accumulation order: gradients are bitwise too, but for the
            # output head shared by the main and the MTP losses when the loss part runs forward in the pair
            # (pairing 1): its two uses land in different segments, so its gradient is summed in another order
            allowed = ["lm_head.weight"] if "/1/" in key else []
            assert res["fb"]["not_bitwise"][key] in ([], allowed), (rank, key, res["fb"]["not_bitwise"][key])


def test_fb_pair_interleaves_exchanges():
    for rank, res in enumerate(results()):
        for key, alternating in res["fb"]["interleaved"].items():
            assert alternating == (not key.endswith("plain")), (rank, key)


def test_dualpipe_with_overlap_equals_one_process():
    for rank, res in enumerate(results()):
        for label, r in res["dualpipe"].items():
            assert r["uses_steps"] and all(r["uses_steps"]), (rank, label, "the parts must run as sub-stages")
            assert r["loss_err"] <= 1e-12, (rank, label, r["loss_err"])
            assert r["grad_errs"], (rank, label)
            worst = max(r["grad_errs"].items(), key=lambda kv: kv[1])
            assert worst[1] <= 1e-10, (rank, label, worst)


# ------------------------------------------------------------------------------------------- one process
class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops run while active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype,impl", [(torch.float64, "loop"), (torch.float32, "grouped")])
def test_recompute_matches_plain(dtype, impl):
    """ep=1: the parts run as sub-stages only because of recomputation. Losses and gradients equal the plain parts'
    bitwise (the same operations, recomputed), also with weight gradients deferred to W; the backward recomputes
    exactly the block norms (one rsqrt each, 2 per block, the MTP depth's included) and the SwiGLU products (one silu
    per dense FFN, shared expert and routed experts), and the plain backward recomputes nothing."""
    from schedules.stage import split_model
    from schedules.weight_grad import WeightGradStore, enable_weight_grad_split

    cfg = compose_cfg(*tiny_overrides(**{"model.expert_impl": impl, "model.seq_aux_loss_alpha": 0.01,
                                         "model.num_nextn_predict_layers": 1}))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g)

    def run(recompute: bool, defer: bool):
        model = build(cfg, dtype)
        parts = split_model(model, 2)
        for p in parts:
            p.recompute = recompute
            enable_weight_grad_split(p)
        assert all(p.uses_steps() == recompute for p in parts)
        h = parts[0](x)
        h_in = h.detach().requires_grad_()
        loss = parts[1](h_in, x, y)
        WeightGradStore.enabled = defer
        try:
            with OpCounter() as ops:
                loss.backward()
                torch.autograd.backward([h], [h_in.grad])
        finally:
            WeightGradStore.enabled = False
        for f in WeightGradStore.take_cache():  # the W of the linears
            f()
        return loss.detach(), grads_of(model), ops.counts

    # the multi-token prediction depth's MoE block runs as sub-stages too (schedules/overlap.py final_steps)
    L = cfg.model.num_hidden_layers + cfg.model.num_nextn_predict_layers
    n_moe = L - cfg.model.first_k_dense_replace
    groups = 1                                            # grouped and loop alike: one silu over all the rows
    ref_loss, ref, ref_ops = run(False, False)
    assert ref_ops.get("aten.rsqrt", 0) == 0 and ref_ops.get("aten.silu", 0) == 0
    for defer in (False, True):
        loss, got, ops = run(True, defer)
        assert torch.equal(loss, ref_loss)
        assert got.keys() == ref.keys()
        for name in ref:
            assert torch.equal(got[name], ref[name]), (name, defer, rel(got[name], ref[name]))
        assert ops.get("aten.rsqrt", 0) == 2 * L, ops
        assert ops.get("aten.silu", 0) == cfg.model.first_k_dense_replace + n_moe * (1 + groups), ops


def test_tape_backward_runs_once_and_interleave_order():
    """A stitched chunk cannot be back-propagated twice; interleave alternates at every yield, the order fixed by
    the generators alone; mismatched outputs and gradients are a ValueError naming the argument."""
    from schedules.overlap import interleave
    from schedules.stage import split_model

    cfg = compose_cfg(*tiny_overrides(**{"model.num_nextn_predict_layers": 0}))
    part = split_model(build(cfg, torch.float64), 1)[0]
    part.recompute = True
    x = torch.randint(0, 300, (2, 8))
    loss = part(x, x, x)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already back-propagated"):
        loss.backward()

    log = []

    def steps(name, n):
        for i in range(n):
            log.append(f"{name}{i}")
            yield
        return name

    assert interleave(steps("b", 3), steps("f", 1)) == ("b", "f")
    assert log == ["b0", "f0", "b1", "b2"]

    with pytest.raises(ValueError, match="output_grads1 has 0 gradients for 1 outputs1"):
        type(part).overlapped_forward_backward(part, [x, x, x], None, [], part, None, [loss], [])
