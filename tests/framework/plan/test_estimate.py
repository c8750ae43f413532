"""The planner's memory terms against the optimizer manager and the schedule, its timing against the simulator and
the routing formula, and V3's published setup against the paper's GPU-hours."""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest
import torch

from framework.models.deepseek_v3.model import DeepSeekV3, count_parameters
from framework.optim.manager import OptimizerStateManager
from framework.plan.devices import DEVICES, Device
from framework.plan.estimate import Layout, Planner, balanced_parts, moment_bytes
from framework.plan.run import setting_from_config
from tests.conftest import compose_cfg

# a device whose links cost nothing and whose process holds nothing before the model
IDEAL = Device("ideal", bf16_flops=1e12, fp8_flops=None, hbm_bytes_s=1e11, memory_bytes=1e12, nvlink_bytes_s=1e30,
               ib_bytes_s=1e30, link_latency_s=0.0, sms=0, gpus_per_node=8, fused_kernels=False)

V3 = ("model=deepseek_v3_671b", "train.seq_len=4096", "train.global_batch_size=15360", "train.dtype=bfloat16",
      "fp8=blockwise", "fp8.dispatch=true", "optim.zero=true", "optim.state.exp_avg=bf16",
      "optim.state.exp_avg_sq=bf16", "cluster=v3_h800")


def _manager_report(params, formats):
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = OptimizerStateManager(params, exp_avg=formats[0], exp_avg_sq=formats[1])
    r = opt.memory_report()
    return {k: r[k] * r["num_params"] for k in ("weights", "master", "grads", "moments")}, r["num_params"]


@pytest.mark.parametrize("dtype,formats", [("float32", ("fp32", "fp32")), ("bfloat16", ("bf16", "bf16")),
                                           ("bfloat16", ("fp8", "fp8")), ("float32", ("fp8", "bf16"))])
def test_memory_terms_match_the_optimizer_manager(dtype, formats):
    """Weights, DualPipe's second copy, gradients, master and moments of a DualPipe rank (pp=4: parts 0 and 3)
    against memory_report() of a manager over exactly that rank's parameters."""
    from schedules.stage import split_model

    cfg = compose_cfg("parallel=dualpipe", "parallel.pp=4", f"train.dtype={dtype}", "cluster.gpus=4",
                      f"optim.state.exp_avg={formats[0]}", f"optim.state.exp_avg_sq={formats[1]}",
                      "train.micro_batches=8", "train.global_batch_size=16")
    torch.manual_seed(0)
    model = DeepSeekV3(cfg.model).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    parts = split_model(model, 4)
    planner = Planner(cfg.model, IDEAL, setting_from_config(cfg))
    lay = Layout("dualpipe", 4, 1, 1, 8, 2, (1, 1, 1, 1))
    plan = planner.plan(lay)
    mem = plan.memory
    first = [p for p in parts[0].parameters()]
    both = first + [p for p in parts[3].parameters()]
    report, n = _manager_report(both, formats)
    assert n == sum(p.numel() for p in both)
    exact = dict(rel=1e-12, abs=1e-6)   # memory_report gives bytes per parameter: x num_params rounds
    assert mem.weights + mem.second_copy == pytest.approx(report["weights"], **exact)
    assert mem.weights == sum(p.numel() * p.element_size() for p in first)
    assert mem.grads == pytest.approx(report["grads"], **exact)
    assert mem.master == pytest.approx(report["master"], **exact)
    # fp8 moments pad each tensor to whole blocks of 128 values
    assert mem.moments == pytest.approx(report["moments"], rel=0.01 if "fp8" in formats else 1e-12, abs=1e-6)
    assert mem.peak_inflight == 4   # outer DualPipe rank: PP in flight (V3 Table 2, schedules.verify)


def test_zero_shards_state_over_data_parallel_and_experts_over_dp_over_ep():
    cfg = compose_cfg(*V3)
    planner = Planner(cfg.model, DEVICES["h800"], setting_from_config(cfg))
    sizes = planner.default_parts("dualpipe", 16)
    a = planner.plan(Layout("dualpipe", 16, 128, 64, 120, 1, sizes)).memory
    parts = planner.parts(sizes)
    held = (a.rank, 15 - a.rank)                              # the fullest rank's two parts
    dense = sum(parts[p].params for p in held)
    expert = sum(parts[p].expert_params for p in held) / 64
    small = sum(parts[p].small_params for p in held) / 128
    router = sum(parts[p].fp32_params for p in held)        # fp32 already: no master copy
    state = dense / 128 + expert / 2                          # experts are replicated dp / ep = 2 times
    assert a.master == pytest.approx(4 * (state - router / 128))
    assert a.moments == pytest.approx((state - small) * 4 + small * 8)
    assert a.grads == pytest.approx(2 * (dense + expert) + 2 * router)
    assert a.activations == pytest.approx(a.peak_inflight * 4096 * max(parts[p].act_bytes for p in held))
    assert a.peak_inflight in (16, 17)                        # DualPipe: PP on outer ranks, PP + 1 in the middle


def test_pipeline_time_is_the_simulated_1f1b_formula():
    """With free links, 1F1B's makespan is (m + pp - 1)(F + B + W) (V3 Table 2's bubble (PP-1)(F+B) plus the work)."""
    cfg = compose_cfg("model.num_nextn_predict_layers=0", "cluster.gpus=4", "train.global_batch_size=16",
                      "train.micro_batches=8")
    planner = Planner(cfg.model, IDEAL, setting_from_config(cfg))
    plan = planner.plan(Layout("1f1b", 4, 1, 1, 8, 2, (1, 1, 1, 1)))
    assert plan.pipeline_s == pytest.approx((8 + 4 - 1) * (plan.F + plan.B + plan.W), rel=1e-9)
    assert plan.bubble == pytest.approx(3 * (plan.F + plan.B + plan.W) / plan.pipeline_s, rel=1e-9)
    assert plan.step_s == pytest.approx(plan.pipeline_s + plan.grad_sync_s + plan.optimizer_s + plan.bookkeeping_s)


def test_all_to_all_follows_node_limited_routing():
    """EP64 over 8 nodes: a token crosses InfiniBand to at most topk_group=4 nodes (7/8 of them remote), then
    NVLink to its 8 experts; FP8 dispatch (1 + 4/128 bytes), BF16 combine, BF16 both ways in backward."""
    cfg = compose_cfg(*V3)
    dev = DEVICES["h800"]
    planner = Planner(cfg.model, dev, replace(setting_from_config(cfg), expert_imbalance=0.0))
    moe = planner.blocks[3]
    C, n = 7168, 4096
    ib, nv = dev.ib_bytes_s * dev.eff.ib, dev.nvlink_bytes_s * dev.eff.nvlink

    def exchange(b, ib_rows, nv_rows):
        return n * max(ib_rows * C * b / ib, nv_rows * C * b / nv) + 2 * dev.link_latency_s
    fwd, bwd = planner.all_to_all(moe, n, ep=64)
    assert fwd == pytest.approx(exchange(1 + 4 / 128, 4 * 7 / 8, 8) + exchange(2, 4 * 7 / 8, 8))
    assert bwd == pytest.approx(2 * exchange(2, 4 * 7 / 8, 8))
    fwd, _ = planner.all_to_all(moe, n, ep=8)                 # one node: NVLink only
    assert fwd == pytest.approx(exchange(1 + 4 / 128, 0, 8 * 7 / 8) + exchange(2, 0, 8 * 7 / 8))
    assert planner.all_to_all(moe, n, ep=1) == (0.0, 0.0)
    assert planner.all_to_all(planner.blocks[0], n, ep=64) == (0.0, 0.0)    # dense layer


def test_expert_imbalance_slows_the_busiest_rank_experts_and_exchanges():
    """With MaxVio v the busiest ep rank receives (1 + v) x the mean rows and computes its experts on them; without
    expert parallelism one rank holds every expert and nothing changes."""
    cfg = compose_cfg(*V3)
    dev = DEVICES["h800"]
    even = Planner(cfg.model, dev, replace(setting_from_config(cfg), expert_imbalance=0.0))
    v = 0.25
    skew = Planner(cfg.model, dev, replace(setting_from_config(cfg), expert_imbalance=v))
    moe, n, lat = even.blocks[3], 4096, 2 * dev.link_latency_s
    for f0, f1 in zip(even.all_to_all(moe, n, 64), skew.all_to_all(moe, n, 64)):
        assert f1 - 2 * lat == pytest.approx((1 + v) * (f0 - 2 * lat), rel=1e-12)    # two exchanges each way
    gemm = even._rates(64)[0]
    F0, B0, W0 = even._compute(moe, n, 64)
    F1, B1, W1 = skew._compute(moe, n, 64)
    extra = n * v * moe.expert_flops / gemm                   # routed experts' matmuls on v more rows
    for a, b in ((F0, F1), (B0, B1), (W0, W1)):
        assert b - a == pytest.approx(extra, rel=1e-9)
    assert skew._compute(moe, n, 1) == even._compute(moe, n, 1)
    assert moe.expert_flops == 2.0 * 8 * 3 * 7168 * 2048     # K x SwiGLU (3 matrices of C x I_moe), 2 per MAC


def test_fb_pairs_expose_what_the_turn_model_leaves():
    """A DualPipe F&B pair costs its compute plus the exposure of overlap.exposed() over its part's MoE blocks, with
    the turns built from the same F, B, W and exchanges; it is never below max(compute, communication)."""
    from framework.plan.overlap import exposed

    cfg = compose_cfg(*V3)
    planner = Planner(cfg.model, DEVICES["h800"], setting_from_config(cfg))
    moe, n = planner.moe_block, 4096
    t = planner.block_turns(moe, n, 64)
    F, B, W = planner._compute(moe, n, 64)
    assert t.compute == pytest.approx(F + B + W, rel=1e-12)
    fwd, bwd = planner.all_to_all(moe, n, 64)
    assert t.communication - t.counts == pytest.approx(fwd + bwd, rel=1e-12)
    parts = planner.parts(planner.default_parts("dualpipe", 16))
    four = parts[1]
    assert four.moe_blocks == 4
    assert planner._pair_exposed(four, n, 64) == pytest.approx(exposed(4, t))
    cF, cB, cW = planner._compute(four, n, 64)
    assert (cF, cB, cW) == pytest.approx((4 * F, 4 * B, 4 * W), rel=1e-12)
    aF, aB = planner.all_to_all(four, n, 64)
    # the pair (its W included, as simulate() charges a full pair) lasts at least its compute and its exchanges
    assert cF + cB + cW + planner._pair_exposed(four, n, 64) >= max(cF + cB + cW, aF + aB) * (1 - 1e-12)
    assert planner._pair_exposed(four, n, 64) > 0 and planner._pair_exposed(four, n, 1) == 0.0


def test_action_overhead_is_added_to_every_action_and_recovered_from_a_step():
    """The executor's time per action h goes on F, B, W and F&B; probe.action_overhead inverts simulate(): from the
    makespan of a DualPipe step whose actions cost h (and messages L) it gives h back."""
    from schedules import build, get_layout
    from schedules.simulate import Costs, simulate
    from framework.plan.probe import action_overhead

    cfg = compose_cfg("parallel=dualpipe", "cluster.gpus=2")
    lay = Layout("dualpipe", 2, 1, 1, 4, 4, (2, 2))
    plain = Planner(cfg.model, IDEAL, setting_from_config(cfg)).plan(lay)
    h = 1e-3
    slow = Planner(cfg.model, replace(IDEAL, action_overhead_s=h), setting_from_config(cfg)).plan(lay)
    for k in ("F", "B", "W", "FB"):
        assert getattr(slow, k) - getattr(plain, k) == pytest.approx(h, rel=1e-9)
    assert slow.pipeline_s > plain.pipeline_s
    for pp, chunks, h0, lat in ((2, 4, 7e-4, 1e-4), (4, 8, 2e-4, 3e-4)):
        step = simulate(build("dualpipe", pp, chunks), get_layout("dualpipe", pp),
                        Costs(F=h0, B=h0, W=h0, FB=h0, p2p=lat)).makespan
        assert action_overhead(step, pp, chunks, lat) == pytest.approx(h0, rel=1e-6)
    assert action_overhead(1e-6, 2, 4, 1e-3) == 0.0            # the messages alone take longer


def test_balanced_parts_is_optimal():
    rng = random.Random(0)
    for _ in range(30):
        costs = [rng.uniform(0.5, 2.0) for _ in range(rng.randint(4, 9))]
        k = rng.randint(2, min(4, len(costs)))
        sizes = balanced_parts(costs, k)
        assert sum(sizes) == len(costs) and min(sizes) >= 1 and len(sizes) == k

        def worst(sz):
            bounds = list(itertools.accumulate(sz, initial=0))
            return max(sum(costs[bounds[i]:bounds[i + 1]]) for i in range(k))
        best = min(worst(c) for c in itertools.product(range(1, len(costs)), repeat=k) if sum(c) == len(costs))
        assert worst(sizes) == pytest.approx(best)


def test_v3_published_setup_matches_the_paper():
    """V3 §1 / Table 1: 180K H800 GPU-hours per trillion tokens on 2048 H800 with PP16, EP64 over 8 nodes, ZeRO-1
    DP, DualPipe, FP8 (V3 §3.2, §3.3); the planner's efficiencies come from spec sheets and published kernel
    figures (framework/plan/devices.py), not from this number."""
    cfg = compose_cfg(*V3)
    planner = Planner(cfg.model, DEVICES["h800"], setting_from_config(cfg))
    plan = planner.plan(Layout("dualpipe", 16, 128, 64, 120, 1, planner.default_parts("dualpipe", 16)))
    assert plan.gpu_hours_per_T == pytest.approx(180e3, rel=0.15)   # -9% (docs/BENCHMARKS.md, Planner)
    assert plan.fits and plan.memory.total <= 80e9
    assert 0 < plan.a2a_exposed < plan.a2a_total               # DualPipe hides most of the all-to-all
    assert plan.bubble < 0.1


def test_moment_bytes_are_the_state_formats():
    from framework.optim.state_format import MomentBuffer
    for fmt in ("fp32", "bf16", "fp8"):
        buf = MomentBuffer(128 * 64, fmt)
        assert moment_bytes(fmt) * 128 * 64 == buf.nbytes()


def test_measured_gemm_shapes_replace_their_flops_price():
    """A device that measured a linear's shape prices that linear's forward, input-gradient and weight-gradient
    GEMM at the measured seconds (x how many the part runs) instead of FLOPs / rate; the other linears keep the rate."""
    from framework.plan.layers import gemm_rows

    cfg = compose_cfg("parallel=dualpipe", "cluster.gpus=2")
    lay = Layout("dualpipe", 2, 1, 1, 4, 4, (2, 2))
    plain = Planner(cfg.model, IDEAL, setting_from_config(cfg))
    tokens = 4 * cfg.train.seq_len
    C, V = cfg.model.hidden_size, cfg.model.vocab_size
    fwd, dgrad, wgrad = 1e-3, 2e-3, 3e-3
    shaped = Planner(cfg.model, replace(IDEAL, gemm_table=(((tokens, C, V), fwd, dgrad, wgrad),)),
                     setting_from_config(cfg))
    head = shaped.parts(lay.layers_per_part)[-1]          # the head and the MTP depth's head: 2 of [T, C] x [C, V]
    count = sum(n for (rows, k, out, _), n in head.gemms if (gemm_rows(rows, tokens), k, out) == (tokens, C, V))
    assert count == 2
    by_rate = 2.0 * tokens * C * V / (IDEAL.bf16_flops * IDEAL.eff.gemm_bf16)    # the head stays high precision
    for got, ref, measured in zip(shaped._compute(head, tokens, 1), plain._compute(head, tokens, 1),
                                  (fwd, dgrad, wgrad)):
        assert got - ref == pytest.approx(count * (measured - by_rate), rel=1e-9)
    first = shaped.parts(lay.layers_per_part)[0]          # no head there: priced as before
    assert shaped._compute(first, tokens, 1) == plain._compute(first, tokens, 1)
    assert shaped.plan(lay).step_s > plain.plan(lay).step_s


def test_trainer_bookkeeping_is_its_syncs_operators_and_norm_traffic():
    """Per step outside the pipeline: 3 small all-reduces (MoE), 6 operators per parameter tensor, 11 per MoE layer
    and 36 bytes per parameter of the gradient norm, on the rank holding the most; none of the syncs on 1 device."""
    from framework.plan.estimate import _actions

    cfg = compose_cfg("parallel=dualpipe", "cluster.gpus=2")
    lay = Layout("dualpipe", 2, 1, 1, 4, 4, (2, 2))
    sync, op, hbm = 1e-3, 2e-6, 1e10
    dev = replace(IDEAL, allreduce_s=sync, op_overhead_s=op, hbm_bytes_s=hbm)
    plan = Planner(cfg.model, dev, setting_from_config(cfg)).plan(lay)
    with torch.device("meta"):
        model = DeepSeekV3(cfg.model)
    # a DualPipe rank of pp=2 holds both parts: the whole model, MTP depth included
    tensors = sum(1 for _ in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    moe_layers = 3 + cfg.model.num_nextn_predict_layers
    norm = 36 * params / (hbm * IDEAL.eff.hbm)
    assert plan.bookkeeping_s == pytest.approx(3 * sync + op * (6 * tensors + 11 * moe_layers) + norm, rel=1e-9)
    single = compose_cfg("cluster.gpus=1")
    one = Planner(single.model, dev, setting_from_config(single)).plan(Layout("single", 1, 1, 1, 4, 4, (4,)))
    assert one.bookkeeping_s == pytest.approx(op * (6 * tensors + 11 * moe_layers) + norm, rel=1e-9)


def test_bookkeeping_operator_counts_are_the_trainers():
    """The constants recounted on the tiny model with a dispatch mode: the gradient norm runs 4 operators per
    parameter tensor (clipping and zero_grad one each), the bias update and MaxVio 11 per MoE layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from framework.models.capabilities import max_vio
    from framework.plan.estimate import OPS_PER_MOE_LAYER, OPS_PER_TENSOR
    from parallel.data_parallel import grad_norm_sq_share

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    class Mesh:
        dp_rank, ep = 0, 1

    model = DeepSeekV3(compose_cfg().model)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    with Count() as norm:
        grad_norm_sq_share(list(model.named_parameters()), Mesh()).item()
    with Count() as clip:
        for p in params:
            p.grad.mul_(0.5)
    # + zero_grad's one per tensor; the norm's 2 per step (its zeros and .item()) are left out
    assert norm.n + clip.n + len(params) - 2 == OPS_PER_TENSOR * len(params)
    with Count() as post:
        loads = model.expert_loads()
        model.update_balance(loads, 1, 300)
        vio = max_vio(loads[loads.sum(-1) > 0])
        vio.mean().item(), vio.tolist()
    assert post.n == OPS_PER_MOE_LAYER * model.moe_layers()


def test_probe_figures_are_medians_over_interleaved_rounds():
    """compute_speeds takes each figure's median over its rounds, so one slow round does not move it, and measures
    each listed linear in its three passes."""
    from framework.plan.devices import compute_speeds

    order, times = [], iter([4.0, 1.0, 2.0, 1e-5, 2e-5, 3e-5,      # round 1: GEMM, memory, operators, 1 shape x 3
                             1.0, 1.0, 2.0, 1e-5, 2e-5, 3e-5,
                             9.0, 5.0, 8.0, 9e-5, 9e-5, 9e-5])      # a slow round
    def fake(fn, budget):
        order.append(budget)
        return next(times)
    m = compute_speeds(fake, shapes=[(8, 16, 32)], rounds=3)
    n = 1024
    assert m["flops"] == pytest.approx(2 * n**3 / 4.0)
    assert m["flops_spread"] == pytest.approx((2 * n**3 / 1.0 - 2 * n**3 / 9.0) / (2 * n**3 / 4.0))
    assert m["hbm"] == pytest.approx(3 * 4 * 2**20 * 4 / 1.0)
    assert m["op_s"] == pytest.approx(2.0 / 101)
    assert m["gemm_table"] == (((8, 16, 32), 1e-5, 2e-5, 3e-5),)
    assert len(order) == 3 * 6


def test_host_time_is_charged_per_operator_of_each_pass():
    """Each part pays its forward operator count (layers.py `ops`) times the device's host seconds per operator of
    F, B and W: the ones measured on the model's own layers where the device has them, else the synthetic
    operator's time with the backward's 1.2x and 0.4x shares."""
    cfg = compose_cfg("parallel=dualpipe", "cluster.gpus=2")
    tokens = 4 * cfg.train.seq_len
    bare = Planner(cfg.model, IDEAL, setting_from_config(cfg))
    own = Planner(cfg.model, replace(IDEAL, layer_op_s=(11e-6, 8e-6, 7e-6)), setting_from_config(cfg))
    synthetic = Planner(cfg.model, replace(IDEAL, op_overhead_s=5e-6), setting_from_config(cfg))
    for part in bare.parts((2, 2)):
        ref = bare._compute(part, tokens, 1)
        for got, base, unit in zip(own._compute(part, tokens, 1), ref, (11e-6, 8e-6, 7e-6)):
            assert got - base == pytest.approx(part.ops * unit, rel=1e-9)
        for got, base, unit in zip(synthetic._compute(part, tokens, 1), ref, (5e-6, 6e-6, 2e-6)):
            assert got - base == pytest.approx(part.ops * unit, rel=1e-9)
    assert bare.parts((2, 2))[1].ops == 2 * (120 + 61) + 30 + 45 + 120 + 61   # two MoE blocks, head, MTP depth


def test_head_logits_and_zeroed_buffers_are_charged_per_unit():
    """With measured per-logit (F, B) seconds and per-value zeroing seconds, each part pays tokens x its logits
    (V per head use: 2 x 4096 for the tiny model's head and MTP depth) and its zeroed values (the embedding's and
    each depth's V x C) in W; a device without them (the GPUs) pays nothing more."""
    cfg = compose_cfg("parallel=dualpipe", "cluster.gpus=2")
    V, C = cfg.model.vocab_size, cfg.model.hidden_size
    tokens = 4 * cfg.train.seq_len
    bare = Planner(cfg.model, IDEAL, setting_from_config(cfg))
    head = Planner(cfg.model, replace(IDEAL, logit_s=(2e-9, 3e-9), zero_s=5e-11), setting_from_config(cfg))
    first, last = bare.parts((2, 2))
    assert (first.logits, first.zeroed) == (0, V * C)
    assert (last.logits, last.zeroed) == (2 * V, V * C)
    for part in (first, last):
        got, ref = head._compute(part, tokens, 1), bare._compute(part, tokens, 1)
        assert [g - r for g, r in zip(got, ref)] == pytest.approx(
            [tokens * part.logits * 2e-9, tokens * part.logits * 3e-9, part.zeroed * 5e-11], rel=1e-9)
    assert (DEVICES["h800"].logit_s, DEVICES["h800"].zero_s) == ((), 0.0)


def test_expert_gemms_are_priced_at_the_expert_parallel_rank_shape():
    """With ep expert-parallel ranks a rank runs E/ep routed experts of ep x K/E rows per token each (the tokens of
    every ep rank dispatched to it): the measured shape it is priced at is that one, counted E/ep times, and
    gemm_shapes lists it for the probe. The FLOPs are the same, so by rate nothing changes."""
    from framework.plan.layers import gemm_shapes

    cfg = compose_cfg("parallel=dualpipe", "cluster.gpus=2")
    m = cfg.model
    E, K, C, Im = m.n_routed_experts, m.num_experts_per_tok, m.hidden_size, m.moe_intermediate_size
    tokens, ep = 4 * cfg.train.seq_len, 2
    rows = round(ep * K / E * tokens)                                  # 2 x 2/8 x 512 = 256 rows per expert
    assert (rows, C, 2 * Im) in gemm_shapes(m, tokens, ep) and (rows, C, 2 * Im) not in gemm_shapes(m, tokens)
    assert (round(K / E * tokens), C, 2 * Im) in gemm_shapes(m, tokens)
    setting = replace(setting_from_config(cfg), expert_imbalance=0.0)
    plain = Planner(m, IDEAL, setting)
    fwd, dgrad, wgrad = 1e-3, 2e-3, 3e-3
    shaped = Planner(m, replace(IDEAL, gemm_table=(((rows, C, 2 * Im), fwd, dgrad, wgrad),)), setting)
    block = plain.moe_block
    by_rate = 2.0 * rows * C * 2 * Im / (IDEAL.bf16_flops * IDEAL.eff.gemm_bf16)
    for got, ref, measured in zip(shaped._compute(block, tokens, ep), plain._compute(block, tokens, ep),
                                  (fwd, dgrad, wgrad)):
        assert got - ref == pytest.approx(E / ep * (measured - by_rate), rel=1e-9)
    assert shaped._compute(block, tokens, 1) == plain._compute(block, tokens, 1)   # ep=1: that shape never runs
    assert plain._compute(block, tokens, ep) == pytest.approx(plain._compute(block, tokens, 1), rel=1e-12)
