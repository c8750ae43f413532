"""Expert parallelism (parallel/expert.py, framework/models/expert_parallel.py) against the single-process MoE of
framework/models/deepseek_v3/moe.py.

Reference: one process runs the full MoE (LocalDispatcher) on the concatenation of every rank's tokens, loss =
sum over ranks of <y_r, g_r>. Each ep rank runs the same weights on its own tokens only; its output and input
gradient must match its slice of the reference, its expert gradients the reference's gradients of the experts it
holds (they already include every peer's tokens, through the all-to-all backward), and its dense gradients summed
over the ep group the reference's. fp32 within 1e-6 relative (norm-wise: reductions run in another order), float64
within 1e-12 (expert_impl=loop: the grouped GEMM takes no float64).
"""
import copy
import math

import pytest
import torch

from tests.parallel.test_mesh import four_rank_results, spawn_ranks

C, I, E = 32, 16, 8
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def moe_cfg(**changes):
    from framework.config import ModelConfig

    base = dict(name="deepseek_v3", vocab_size=64, hidden_size=C, moe_intermediate_size=I, n_routed_experts=E,
                num_experts_per_tok=2, n_shared_experts=1)
    base.update(changes)
    return ModelConfig(**base)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    ref = b.norm()
    return float((a - b).norm() / ref) if ref > 0 else float((a - b).norm())


def build_pair(mesh, cfg, dtype, bias=None, fp8=False):
    """(reference full MoE, expert-parallel copy) with identical weights."""
    from framework.models.deepseek_v3.moe import MoE
    from framework.models.expert_parallel import apply_expert_parallel

    torch.manual_seed(0)
    ref = MoE(cfg).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
        if bias is not None:
            ref.gate.e_score_correction_bias.copy_(bias)
    return ref, apply_expert_parallel(copy.deepcopy(ref), mesh, fp8_dispatch=fp8)


class QuantizingDispatcher:
    """LocalDispatcher whose expert inputs are FP8 round-tripped (1x128 tiles, power-of-two scales) with a
    straight-through gradient: what an FP8 dispatch payload does to the experts."""

    def __init__(self, inner):
        self.inner = inner

    def dispatch(self, x, topk_idx, topk_weight):
        from framework.fp8.quantize import dequantize_act, quantize_act

        xq = dequantize_act(*quantize_act(x.detach(), pow2=True), dtype=x.dtype)
        return self.inner.dispatch(x + (xq - x).detach(), topk_idx, topk_weight)

    def combine(self, y_sorted, ctx):
        return self.inner.combine(y_sorted, ctx)


def layer_checks(mesh, tag, cfg, dtype, tokens, bias=None, fp8=False) -> dict:
    """Errors of one MoE layer under EP vs the reference; tokens[r] = rows on ep rank r."""
    import torch.distributed as dist

    ref, moe = build_pair(mesh, cfg, dtype, bias, fp8)
    if fp8:
        ref.dispatcher = QuantizingDispatcher(ref.dispatcher)
    r = mesh.ep_rank
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, n, C, generator=g, dtype=dtype) for n in tokens]
    gs = [torch.randn(1, n, C, generator=g, dtype=dtype) for n in tokens]
    X = torch.cat(xs, dim=1).requires_grad_()
    Y = ref(X)
    (Y * torch.cat(gs, dim=1)).sum().backward()
    x = xs[r].clone().requires_grad_()
    y = moe(x)
    (y * gs[r]).sum().backward()
    lo = sum(tokens[:r])
    hi = lo + tokens[r]
    out = {f"{tag}.forward": rel(y, Y[:, lo:hi]), f"{tag}.dx": rel(x.grad, X.grad[:, lo:hi]),
           f"{tag}.zero_token_experts": int((ref.gate.load == 0).sum())}
    ref_params = dict(ref.named_parameters())
    local = moe.experts.expert_ids
    dense_err, expert_err = 0.0, 0.0
    for name, p in moe.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        want = ref_params[name].grad
        want = torch.zeros_like(ref_params[name]) if want is None else want
        if getattr(p, "_duet_expert", False):
            expert_err = max(expert_err, rel(grad, want[local.start:local.stop]))
        else:
            total = grad.clone()
            dist.all_reduce(total, group=mesh.ep_group)
            dense_err = max(dense_err, rel(total, want))
    out[f"{tag}.dense_grads"] = dense_err
    out[f"{tag}.expert_grads"] = expert_err
    out[f"{tag}.n_local_experts"] = len(local)
    return out


def async_checks(mesh) -> dict:
    """start_dispatch/start_combine with work in between == dispatch/combine, bit for bit, forward and backward."""
    _, moe = build_pair(mesh, moe_cfg(), torch.float32)
    g = torch.Generator().manual_seed(11 + mesh.ep_rank)
    x0 = torch.randn(9, C, generator=g)
    gy = torch.randn(9, C, generator=g)
    idx, w0, _ = moe.gate.route(x0)
    d = moe.dispatcher
    runs = []
    for use_async in (False, True):
        moe.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(), w0.detach().clone().requires_grad_()
        if use_async:
            pending = d.start_dispatch(x, idx, w)
            side = moe.shared_experts(x)                     # computed while the rows are in flight
            x_sorted, counts, ctx = pending.wait()
            pending = d.start_combine(moe.experts(x_sorted, counts), ctx)
            side = side + moe.shared_experts(2 * x)
            y = pending.wait()
        else:
            x_sorted, counts, ctx = d.dispatch(x, idx, w)
            y = d.combine(moe.experts(x_sorted, counts), ctx)
            side = moe.shared_experts(x) + moe.shared_experts(2 * x)
        ((y + 0 * side) * gy).sum().backward()
        runs.append((y.detach(), x.grad, w.grad, moe.experts.gate_up_proj.grad.clone(),
                     moe.experts.down_proj.grad.clone()))
    blocking, asynchronous = runs
    return {"async.max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(blocking, asynchronous))}


def layout_checks(mesh) -> dict:
    """The padded layout (fixed-size dispatch, no count exchange) == the counts layout, bit for bit: outputs, token,
    routing-weight and expert gradients, in fp32, bf16 and with an FP8 payload, top-2 and top-1; with unequal token
    counts per rank (padded up to a capacity) and a rank without tokens. Its trace: no counts, a dispatch of
    (ep-1) * capacity slots of (row + K int32 choices), and the same routed rows as the counts layout on the way
    back."""
    from parallel import exchanges
    out = {}
    top1 = dict(num_experts_per_tok=1, norm_topk_prob=False)
    for tag, cfg, dtype, fp8, tokens in (("fp32", moe_cfg(), torch.float32, False, (6, 5)),
                                         ("fp8", moe_cfg(), torch.float32, True, (6, 5)),
                                         ("bf16", moe_cfg(expert_impl="loop"), torch.bfloat16, False, (6, 5)),
                                         ("top1", moe_cfg(**top1), torch.float32, False, (6, 5)),
                                         ("empty", moe_cfg(), torch.float32, False, (8, 0)),
                                         ("fp8_empty", moe_cfg(), torch.float32, True, (0, 8))):
        runs = []
        for layout in ("counts", "padded"):
            _, moe = build_pair(mesh, cfg, dtype, fp8=fp8)
            d = moe.dispatcher
            d.layout, d.capacity = layout, max(tokens)
            d.recorder = exchanges.CommRecorder()
            g = torch.Generator().manual_seed(21 + mesh.ep_rank)
            x = torch.randn(1, tokens[mesh.ep_rank], C, generator=g).to(dtype).requires_grad_()
            y = moe(x)
            (y * torch.randn(y.shape, generator=g).to(dtype)).sum().backward()
            grads = [p.grad.clone() for p in moe.parameters() if p.grad is not None]
            runs.append(([y.detach(), x.grad] + grads, d.recorder.records))
        (a, _), (b, records) = runs
        out[f"layout.{tag}.tensors"] = len(a)
        out[f"layout.{tag}.max_abs_diff"] = max(float((u - v).abs().max()) if u.numel() else 0.0
                                                for u, v in zip(a, b))
        out[f"layout.{tag}.same_dtypes"] = a[0].dtype == dtype and all(u.dtype == v.dtype for u, v in zip(a, b))
        out[f"layout.{tag}.names"] = [r.name for r in records]
        out[f"layout.{tag}.bytes"] = [r.nbytes for r in records]
        out[f"layout.{tag}.counts_bytes"] = [r.nbytes for r in runs[0][1]]
    out["layout.fp32.expected_dispatch_bytes"] = (mesh.ep - 1) * 6 * (4 * C + 4 * 2)
    out["layout.fp8.expected_dispatch_bytes"] = (mesh.ep - 1) * 6 * (C + 4 * math.ceil(C / 128) + 4 * 2)
    out["layout.bf16.expected_dispatch_bytes"] = (mesh.ep - 1) * 6 * (2 * C + 4 * 2)
    out["layout.top1.expected_dispatch_bytes"] = (mesh.ep - 1) * 6 * (4 * C + 4 * 1)
    _, moe = build_pair(mesh, moe_cfg(), torch.float32)
    moe.dispatcher.layout, moe.dispatcher.capacity = "padded", 3
    try:
        moe(torch.randn(1, 4, C))
        out["layout.over_capacity"] = None
    except ValueError as e:
        out["layout.over_capacity"] = str(e)
    return out


def trace_checks(mesh) -> dict:
    """One layer forward+backward records counts, dispatch, combine and both backward exchanges, with the bytes this
    rank sends to / receives from its peer (fp32 rows; FP8 rows are C bytes + one fp32 scale per 128 channels)."""
    from parallel import exchanges
    out = {}
    for fp8 in (False, True):
        ref, moe = build_pair(mesh, moe_cfg(), torch.float32, fp8=fp8)
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(7, C, generator=g) for _ in range(mesh.ep)]
        owner = [ref.gate.route(x)[0] // (E // mesh.ep) for x in xs]          # [N, K] destination ranks
        me = mesh.ep_rank
        sent = int((owner[me] != me).sum())
        received = sum(int((owner[j] == me).sum()) for j in range(mesh.ep) if j != me)
        recorder = exchanges.CommRecorder()
        moe.dispatcher.recorder = recorder
        moe(xs[me][None].requires_grad_()).sum().backward()
        tag = "fp8" if fp8 else "fp32"
        out[f"trace.{tag}.names"] = [r.name for r in recorder.records]
        out[f"trace.{tag}.bytes"] = [r.nbytes for r in recorder.records]
        row = C + 4 * math.ceil(C / 128) if fp8 else 4 * C
        out[f"trace.{tag}.expected_bytes"] = [8 * (E - E // mesh.ep), max(sent, received) * row,
                                              max(sent, received) * 4 * C, max(sent, received) * 4 * C,
                                              max(sent, received) * 4 * C]
        out[f"trace.{tag}.ordered"] = all(r.start <= r.end and r.waited >= 0 for r in recorder.records)
    return out


def link_checks(mesh) -> dict:
    """An emulated link changes no number and makes every exchange last at least its modeled time."""
    from parallel import exchanges
    _, moe = build_pair(mesh, moe_cfg(), torch.float32)
    x = torch.randn(1, 6, C, generator=torch.Generator().manual_seed(mesh.ep_rank)).requires_grad_()
    plain = moe(x)
    link = exchanges.EmulatedLink(latency_us=20_000, gbps=0.05)
    recorder = exchanges.CommRecorder()
    moe.dispatcher.link, moe.dispatcher.recorder = link, recorder
    linked = moe(x)
    linked.sum().backward()
    modeled = [r for r in recorder.records if r.emulated]
    return {"link.same_output": bool(torch.equal(plain.detach(), linked.detach())),
            "link.emulated_exchanges": len(modeled),
            "link.slack": min(r.duration - link.seconds(r.nbytes) for r in modeled)}


def model_checks(mesh) -> dict:
    """apply_expert_parallel on a whole DeepSeek-V3 (MLA, 2 MoE layers incl. one MTP depth, group-limited routing):
    loss and every gradient vs the full model in one process."""
    import torch.distributed as dist

    from framework.models.deepseek_v3.model import DeepSeekV3
    from framework.models.expert_parallel import apply_expert_parallel

    cfg = moe_cfg(num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, max_position_embeddings=32,
                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                  first_k_dense_replace=1, n_group=2, topk_group=1, num_nextn_predict_layers=1,
                  expert_impl="loop")
    torch.manual_seed(0)
    full = DeepSeekV3(cfg).double()
    model = apply_expert_parallel(copy.deepcopy(full), mesh)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g))
               for _ in range(mesh.ep)]
    ref_losses = [full.compute_loss(ids, labels)[0] for ids, labels in batches]
    sum(ref_losses).backward()
    loss = model.compute_loss(*batches[mesh.ep_rank])[0]
    loss.backward()
    ref_params = dict(full.named_parameters())
    n_expert, dense_err, expert_err = 0, 0.0, 0.0
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if getattr(p, "_duet_expert", False):
            n_expert += 1
            lo = mesh.ep_rank * E // mesh.ep
            expert_err = max(expert_err, rel(p.grad, want[lo:lo + E // mesh.ep]))
            expert_err = max(expert_err, rel(p.detach(), ref_params[name].detach()[lo:lo + E // mesh.ep]))
        else:
            total = p.grad.clone()
            dist.all_reduce(total, group=mesh.ep_group)
            dense_err = max(dense_err, rel(total, want))
    return {"model.loss": abs(float(loss) - float(ref_losses[mesh.ep_rank])) / abs(float(loss)),
            "model.dense_grads": dense_err, "model.expert_grads": expert_err, "model.expert_params": n_expert}


def config_and_error_checks(mesh) -> dict:
    """apply_expert_parallel reads fp8.dispatch and parallel.comm.emulate_link from a Config; bad input is a
    one-line ValueError naming what is wrong."""
    from types import SimpleNamespace

    from framework.models.deepseek_v3.moe import MoE
    from framework.models.expert_parallel import apply_expert_parallel
    from parallel.expert import ExpertParallelDispatcher

    cfg = SimpleNamespace(fp8=SimpleNamespace(dispatch=True),
                          parallel=SimpleNamespace(comm=SimpleNamespace(emulate_link={"latency_us": 3, "gbps": 8})))
    d = apply_expert_parallel(MoE(moe_cfg()), mesh, cfg=cfg).dispatcher
    out = {"cfg.fp8": d.fp8, "cfg.link_seconds": d.link.seconds(10**6)}
    messages = []
    for bad in (lambda: ExpertParallelDispatcher(7, mesh.ep_group),
                lambda: d.dispatch(torch.zeros(4, C), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))):
        try:
            bad()
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    out["errors"] = messages
    return out


def two_rank_checks(rank: int) -> dict:
    from parallel.mesh import init_mesh

    mesh = init_mesh(1, 2, 2, device="cpu", backend="gloo", timeout_s=120)
    out = {}
    out.update(layer_checks(mesh, "fp32", moe_cfg(), torch.float32, tokens=(6, 5)))
    out.update(layer_checks(mesh, "fp64", moe_cfg(expert_impl="loop"), torch.float64, tokens=(6, 5)))
    # every token's two choices are experts 0 and 1 (rank 0): rank 1 receives no rows, experts 2..7 none
    bias = torch.zeros(E)
    bias[:2] = 10.0
    out.update(layer_checks(mesh, "rank0_only", moe_cfg(), torch.float32, tokens=(6, 5), bias=bias))
    # top-1 routing, every token to expert 5 (on rank 1): the other 7 experts and all of rank 0's receive nothing
    bias = torch.zeros(E)
    bias[5] = 10.0
    out.update(layer_checks(mesh, "one_expert", moe_cfg(num_experts_per_tok=1, norm_topk_prob=False,
                                                          expert_impl="loop"), torch.float64, tokens=(4, 7),
                            bias=bias))
    # a rank without tokens still serves its experts
    out.update(layer_checks(mesh, "empty_rank", moe_cfg(), torch.float32, tokens=(8, 0)))
    out.update(layer_checks(mesh, "fp8", moe_cfg(), torch.float32, tokens=(6, 5), fp8=True))
    out.update(async_checks(mesh))
    out.update(layout_checks(mesh))
    out.update(trace_checks(mesh))
    out.update(link_checks(mesh))
    out.update(model_checks(mesh))
    out.update(config_and_error_checks(mesh))
    return out


def ep4_checks(mesh) -> dict:
    """ep=4 (called by the 4-rank worker of test_mesh.py): unequal and empty splits, node-limited routing."""
    from parallel.expert import group_ranks, ranks_per_token

    out = {}
    limited = moe_cfg(num_experts_per_tok=3, n_group=4, topk_group=2)
    out.update(layer_checks(mesh, "ep4", limited, torch.float32, tokens=(5, 3, 1, 9)))
    out.update(layer_checks(mesh, "ep4_fp64", moe_cfg(expert_impl="loop"), torch.float64, tokens=(2, 7, 0, 4)))
    # node-limited routing: groups = ep ranks, topk_group = 2 -> every token reaches at most 2 ranks
    from framework.models.deepseek_v3.moe import Router

    x = torch.randn(256, C, generator=torch.Generator().manual_seed(2))
    for tag, cfg in (("limited", limited), ("unlimited", moe_cfg(num_experts_per_tok=3))):
        torch.manual_seed(1)
        router = Router(cfg)
        torch.nn.init.normal_(router.weight, std=1.0)
        idx = router(x)[0]
        out[f"node_limit.{tag}.max_ranks"] = int(ranks_per_token(idx, E, mesh.ep).max())
        if tag == "limited":
            # the ranks a token reaches are exactly the ranks of the groups it picked (group g = experts g*2, g*2+1)
            owners = group_ranks(4, mesh.ep)
            agree = all({r for g in set((row // (E // 4)).tolist()) for r in owners[g]}
                        == set((row // (E // mesh.ep)).tolist()) for row in idx)
            out["node_limit.mapping_agrees"] = agree
    return out


# ------------------------------------------------------------------------------------------------ tests

def two_rank_results() -> list[dict]:
    return spawn_ranks(2, "tests.parallel.test_expert:two_rank_checks")


LAYER_CASES = [("fp32", torch.float32), ("fp64", torch.float64), ("rank0_only", torch.float32),
               ("one_expert", torch.float64), ("empty_rank", torch.float32), ("fp8", torch.float32)]


@pytest.mark.parametrize("tag,dtype", LAYER_CASES, ids=[t for t, _ in LAYER_CASES])
def test_ep2_layer_matches_single_process(tag, dtype):
    for rank, res in enumerate(two_rank_results()):
        assert res[f"{tag}.n_local_experts"] == E // 2
        for what in ("forward", "dx", "dense_grads", "expert_grads"):
            assert res[f"{tag}.{what}"] <= TOL[dtype], (tag, rank, what, res[f"{tag}.{what}"])


def test_imbalanced_routings_leave_experts_without_tokens():
    res = two_rank_results()[0]
    assert res["rank0_only.zero_token_experts"] == E - 2
    assert res["one_expert.zero_token_experts"] == E - 1


def test_async_dispatch_combine_equals_blocking():
    for res in two_rank_results():
        assert res["async.max_abs_diff"] == 0.0


@pytest.mark.parametrize("tag", ["fp32", "fp8", "bf16", "top1", "empty", "fp8_empty"])
def test_padded_layout_equals_counts_layout(tag):
    for res in two_rank_results():
        assert res[f"layout.{tag}.tensors"] >= 2 + 4                 # y, dx, router, shared, 2 expert weights
        assert res[f"layout.{tag}.max_abs_diff"] == 0.0
        assert res[f"layout.{tag}.same_dtypes"]
        assert res[f"layout.{tag}.names"] == ["moe.dispatch", "moe.combine", "moe.combine.backward",
                                              "moe.dispatch.backward"]
        # the combine and both backward exchanges move exactly what the counts layout moves
        assert res[f"layout.{tag}.bytes"][1:] == res[f"layout.{tag}.counts_bytes"][2:]
        if f"layout.{tag}.expected_dispatch_bytes" in res:
            assert res[f"layout.{tag}.bytes"][0] == res[f"layout.{tag}.expected_dispatch_bytes"]


def test_padded_layout_refuses_more_tokens_than_its_capacity():
    for res in two_rank_results():
        assert res["layout.over_capacity"].startswith("dispatch: 4 tokens exceed the padded layout's capacity of 3")


@pytest.mark.parametrize("tag", ["fp32", "fp8"])
def test_traces_record_every_exchange_with_its_bytes(tag):
    for res in two_rank_results():
        assert res[f"trace.{tag}.names"] == ["moe.counts", "moe.dispatch", "moe.combine", "moe.combine.backward",
                                             "moe.dispatch.backward"]
        assert res[f"trace.{tag}.bytes"] == res[f"trace.{tag}.expected_bytes"]
        assert res[f"trace.{tag}.ordered"]


def test_emulated_link_delays_but_changes_nothing():
    for res in two_rank_results():
        assert res["link.same_output"]
        assert res["link.emulated_exchanges"] == 5          # counts, dispatch, combine and the 2 backward
        assert res["link.slack"] >= -1e-9                  # (start + t) - start rounds by ~1e-15


def test_whole_model_under_expert_parallelism():
    for res in two_rank_results():
        assert res["model.expert_params"] == 2 * 2          # gate_up_proj and down_proj of 2 MoE layers (1 is MTP)
        assert res["model.loss"] <= 1e-12
        assert res["model.dense_grads"] <= 1e-12
        assert res["model.expert_grads"] <= 1e-12


def test_config_is_read_and_bad_input_is_named():
    for res in two_rank_results():
        assert res["cfg.fp8"] is True
        assert res["cfg.link_seconds"] == pytest.approx(3e-6 + 1e-3, rel=1e-12)
        too_few, bad_shapes = res["errors"]
        assert too_few.startswith("model.n_routed_experts=7: must be a multiple of parallel.ep=2")
        assert bad_shapes.startswith("dispatch: x [N, C], topk_idx [N, K] and topk_weight [N, K] expected")


@pytest.mark.parametrize("tag,dtype", [("ep4", torch.float32), ("ep4_fp64", torch.float64)])
def test_ep4_layer_matches_single_process(tag, dtype):
    for rank, res in enumerate(four_rank_results()):
        for what in ("forward", "dx", "dense_grads", "expert_grads"):
            assert res[f"{tag}.{what}"] <= TOL[dtype], (tag, rank, what, res[f"{tag}.{what}"])


def test_node_limited_routing_caps_ranks_per_token():
    for res in four_rank_results():
        assert res["node_limit.limited.max_ranks"] <= 2
        assert res["node_limit.unlimited.max_ranks"] == 3     # without the limit the cap is really exceeded
        assert res["node_limit.mapping_agrees"]


# ------------------------------------------------------------------------------------------------ single process

def test_local_expert_range_and_group_ranks():
    from parallel.expert import group_ranks, local_expert_range

    assert [local_expert_range(8, 4, r) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert group_ranks(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert group_ranks(8, 4) == [range(0, 1), range(0, 1), range(1, 2), range(1, 2), range(2, 3), range(2, 3),
                                 range(3, 4), range(3, 4)]
    assert group_ranks(2, 8) == [range(0, 4), range(4, 8)]
    with pytest.raises(ValueError, match="parallel.ep=3"):
        local_expert_range(8, 3, 0)
    with pytest.raises(ValueError, match="model.n_group=3"):
        group_ranks(3, 2)


def test_ranks_per_token():
    from parallel.expert import ranks_per_token

    idx = torch.tensor([[0, 1], [0, 7], [2, 5]])
    assert ranks_per_token(idx, 8, 4).tolist() == [1, 2, 2]


def test_emulated_link_model_and_bad_values():
    from parallel.exchanges import EmulatedLink

    link = EmulatedLink(latency_us=10, gbps=8)
    assert link.seconds(1_000_000) == pytest.approx(10e-6 + 1e-3, rel=1e-12)
    assert EmulatedLink.from_config(None) is None
    assert EmulatedLink.from_config({"latency_us": 5, "gbps": 0}).seconds(10**9) == pytest.approx(5e-6)
    with pytest.raises(ValueError, match="emulate_link.gbps"):
        EmulatedLink(latency_us=1, gbps=-1)
    with pytest.raises(ValueError, match="emulate_link has unknown keys"):
        EmulatedLink.from_config({"latency": 1})
