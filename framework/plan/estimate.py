"""One layout's plan: per-GPU memory split, per-action costs, the schedule's simulated step, throughput.

A layout is (schedule, pp, dp, ep, micro-batches, micro-batch size, layers per part). Its costs come from the
per-token costs of the layers (layers.py) and a device model (devices.py):

  compute   FLOPs / (peak x efficiency x share of SMs left to compute), elementwise traffic (each kept tensor written
            and read once) / memory bandwidth, and on cpu the host time of each eager operator
  F, B, W   forward; input-gradient backward (the linears' dgrad, attention backward, recomputation); weight gradient
  all-to-all  node-limited routing (V3 §3.2.2): a token is sent over InfiniBand once to each of the at most
            `topk_group` nodes its experts live on, then forwarded over NVLink to its K experts; with expert
            parallelism inside one node only NVLink is used. Dispatch FP8 (with fp8.dispatch), combine BF16; the
            backward moves the same rows in BF16 both ways.
  imbalance with expert parallelism the busiest rank of an exchange receives (1 + MaxVio) x the mean rows and runs
            its experts on them; every rank waits for it at the combine (EXPERT_MAXVIO_BATCH below)
  overlap   DualPipe / DualPipeV with parallel.overlap run an F&B pair's all-to-all under the other chunk's
            compute, turn by turn as schedules/overlap.py interleaves them (framework/plan/overlap.py): what the
            turns cannot cover is exposed; other actions wait for their own exchanges.
  host      on cpu, the executor's own time per action (measured at start-up, framework/plan/probe.py) is added
            to every action, and the p2p latency is the one measured between the processes
  GEMMs     by FLOPs at the device's GEMM rate; a device that measured the run's own linear shapes (cpu,
            devices.gemm_table) prices each linear's forward, input-gradient and weight-gradient GEMM at its shape
  step      the schedule's makespan from schedules.simulate (uniform per-stage costs: the slowest rank's), plus the
            gradient exchange after the pipeline (mirror copies and data parallel, not overlapped), the optimizer
            and the trainer's own per-step work (its small all-reduces, gradient norm, bias update: bookkeeping).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from framework.plan.devices import Device
from framework.plan.layers import (LayerCost, block_cost, embedding_cost, gemm_rows, head_cost, is_moe_layer,
                                   rank_gemm)

GiB = 2.0**30

# Expert load imbalance inside one exchange: MaxVio_batch = (max load - mean) / mean, measured for
# auxiliary-loss-free balancing (u = 1e-3, V3 §2.1.2) by bench/balance.py on deepseek_v3_tiny: 0.380, the mean over
# the last quarter of 200 steps (docs/BENCHMARKS.md, "Expert balance"). It is the busiest EXPERT's excess; an ep rank
# holding several experts averages over them, so for V3's 4 experts per rank it is an upper bound, and the tiny run's
# bias had not converged (it moves at most 200 x u = 0.2 in 200 steps). The lower end of what is published is the
# paper's converged global figure, MaxVio_global 0.04 (arXiv 2408.15664 Table 2); bench/plan.py reports both.
EXPERT_MAXVIO_BATCH = 0.380

# The trainer's per-step work around the pipeline and the optimizer (framework/trainer.py train_step): small
# all-reduces of the loss (with the stop flag), of the gradient norm and, for MoE models, of the expert loads; per
# parameter tensor 6 operators: the gradient norm's 4 (double, pow, sum, add; parallel/data_parallel.py), clipping
# and zero_grad; per MoE layer 11 (the bias update and MaxVio: 44 for deepseek_v3_tiny's 4 MoE layers); and the
# norm's traffic per parameter, 36 bytes (the fp32 gradient read, its float64 copy written, squared, summed).
# Counted with a dispatch mode over the tiny model (tests/framework/plan/test_estimate.py recounts them).
TRAINER_SYNCS_DENSE, TRAINER_SYNCS_MOE = 2, 3
OPS_PER_TENSOR = 6
OPS_PER_MOE_LAYER = 11
NORM_BYTES_PER_PARAM = 36


def moment_bytes(fmt: str, block: int = 128) -> float:
    """Bytes per value of one AdamW moment (framework/optim/state_format.py): fp8 adds one fp32 scale per block."""
    return {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0 + 4.0 / block}[fmt]


@dataclass(frozen=True)
class Layout:
    schedule: str
    pp: int
    dp: int
    ep: int
    micro_batches: int          # per data-parallel rank and step
    micro_batch_size: int       # sequences per micro-batch
    layers_per_part: tuple[int, ...]


@dataclass
class Memory:
    """Bytes on the fullest rank, by term."""
    weights: float = 0.0        # the rank's first part
    second_copy: float = 0.0    # DualPipe's mirrored part (DualPipeV: the V's second part)
    grads: float = 0.0
    master: float = 0.0
    moments: float = 0.0
    activations: float = 0.0
    recompute: float = 0.0
    workspace: float = 0.0      # one micro-batch's activations of a part again: backward's gradients, temporaries
    comm_buffers: float = 0.0
    runtime: float = 0.0
    peak_inflight: int = 0      # micro-batches whose activations are alive at the peak (schedule)
    rank: int = 0               # the pipeline rank these figures are of

    @property
    def total(self) -> float:
        return (self.weights + self.second_copy + self.grads + self.master + self.moments + self.activations
                + self.recompute + self.workspace + self.comm_buffers + self.runtime)


@dataclass
class Plan:
    layout: Layout
    memory: Memory
    capacity: float
    F: float = 0.0
    B: float = 0.0
    W: float = 0.0
    FB: float = 0.0
    a2a_exposed: float = 0.0    # seconds per step the worst rank waits for all-to-all
    a2a_total: float = 0.0      # seconds per step of all-to-all on that rank
    pipeline_s: float = 0.0     # the schedule's makespan
    bubble: float = 0.0         # idle share of the pipeline's makespan, worst rank
    grad_sync_s: float = 0.0
    optimizer_s: float = 0.0
    bookkeeping_s: float = 0.0  # the trainer's per-step work outside the pipeline and the optimizer
    step_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0            # model FLOPs / (GPUs x dense BF16 peak) (cpu: the measured fp32 GEMM)
    gpu_hours_per_T: float = 0.0
    sim: object = field(default=None, repr=False)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def over_bytes(self) -> float:
        return self.memory.total - self.capacity


@dataclass(frozen=True)
class Setting:
    """What the configuration fixes, besides the layout."""
    gpus: int
    seq_len: int
    global_batch_size: int
    dtype_bytes: int            # working weights (and their gradients): 4 for float32, 2 for bfloat16
    fp8: bool
    fp8_dispatch: bool
    zero: bool
    moments: tuple[str, str]
    overlap: bool
    comm_sms: int
    expert_imbalance: float = EXPERT_MAXVIO_BATCH   # busiest ep rank's excess load in one exchange (MaxVio)


def balanced_parts(costs: list[float], parts: int) -> tuple[int, ...]:
    """Layers per part that minimise the slowest part (contiguous split; costs[0] and costs[-1] carry the
    embedding and the head): the classic linear-partition dynamic programme."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    INF = math.inf
    best = [[INF] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n - (parts - p) + 1):
            for j in range(p - 1, i):
                v = max(best[p - 1][j], prefix[i] - prefix[j])
                if v < best[p][i]:
                    best[p][i], cut[p][i] = v, j
    sizes, i = [], n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        sizes.append(i - j)
        i = j
    return tuple(reversed(sizes))


class Planner:
    """Plans layouts of one model on one device type."""

    def __init__(self, model_cfg, device: Device, setting: Setting):
        self.m, self.dev, self.s = model_cfg, device, setting
        fused, a = device.fused_kernels, setting.dtype_bytes
        act_bytes = 2 if fused else a
        self.blocks = [block_cost(model_cfg, is_moe_layer(model_cfg, i), setting.seq_len, act_bytes, fused, setting.fp8)
                       for i in range(model_cfg.num_hidden_layers)]
        # one MoE block (the MTP depths' blocks are MoE too): the shape of every F&B turn of a part
        self.moe_block = block_cost(model_cfg, True, setting.seq_len, act_bytes, fused, setting.fp8)
        self.embed = embedding_cost(model_cfg)
        self.head = head_cost(model_cfg, setting.seq_len, act_bytes, fused, setting.fp8,
                              bool(getattr(model_cfg, "tie_word_embeddings", False)))

    # -- parts ------------------------------------------------------------------------------------------------------
    def parts(self, sizes: tuple[int, ...]) -> list[LayerCost]:
        out, start = [], 0
        for k, n in enumerate(sizes):
            c = sum(self.blocks[start:start + n], LayerCost())
            if k == 0:
                c = c + self.embed
            if k == len(sizes) - 1:
                c = c + self.head
            out.append(c)
            start += n
        return out

    def default_parts(self, schedule: str, pp: int) -> tuple[int, ...]:
        """Layers per part balancing the compute time of each part (first: + embedding, last: + head and MTP)."""
        num_parts = 2 * pp if schedule == "dualpipev" else pp
        def cost(c: LayerCost) -> float:   # one sequence's forward and backward
            return sum(self._compute(c, self.s.seq_len, ep=1))
        per = [cost(c) for c in self.blocks]
        if len(per) < num_parts:
            raise ValueError(f"model.num_hidden_layers={len(per)}: fewer layers than the {num_parts} pipeline parts")
        per[0] += cost(self.embed)
        per[-1] += cost(self.head)
        return balanced_parts(per, num_parts)

    # -- costs ------------------------------------------------------------------------------------------------------
    def _rates(self, ep: int) -> tuple[float, float, float, float]:
        """FLOP/s of FP8-able GEMMs, BF16 GEMMs, attention forward and backward, with SMs lent to communication."""
        d, e = self.dev, self.dev.eff
        share = d.compute_share(self.s.comm_sms if ep > 1 else 0)
        gemm = (d.fp8_flops * e.gemm_fp8 if self.s.fp8 and d.fp8_flops else d.bf16_flops * e.gemm_bf16) * share
        return gemm, d.bf16_flops * e.gemm_bf16 * share, d.bf16_flops * e.attn_fwd * share, \
            d.bf16_flops * e.attn_bwd * share

    def _linears(self, c: LayerCost, tokens: float, ep: int) -> tuple[float, float, float]:
        """Seconds of `c`'s linears for `tokens` tokens: (forward, input gradient, weight gradient). Each GEMM the
        device measured at its own shape (rows = rows per token x tokens) takes its measured time; the others, and
        every GEMM of a spec-sheet device, take FLOPs / rate, the same for the three passes."""
        gemm, bf16, _, _ = self._rates(ep)
        excess = self._excess(ep)
        rated = (c.gemm_flops + excess * c.expert_flops) / gemm + c.bf16_flops / bf16
        if not self.dev.gemm_table:
            return tokens * rated, tokens * rated, tokens * rated
        f = b = w = tokens * rated
        for linear, count in c.gemms:
            (rows, k, n, kind), count = rank_gemm(linear, count, ep)   # a routed expert: E/ep, ep x taller
            measured = self.dev.gemm_seconds(gemm_rows(rows, tokens), k, n)
            if measured is None:
                continue
            scale = count * (1 + excess if kind == "expert" else 1.0)
            by_rate = scale * tokens * 2.0 * rows * k * n / (bf16 if kind == "high" else gemm)
            f, b, w = f - by_rate + scale * measured[0], b - by_rate + scale * measured[1], \
                w - by_rate + scale * measured[2]
        return f, b, w

    def _compute(self, c: LayerCost, tokens: float, ep: int) -> tuple[float, float, float]:
        """(F, B, W) compute seconds of `c` for `tokens` tokens."""
        gemm, bf16, attn_f, attn_b = self._rates(ep)
        d = self.dev
        bw = d.hbm_bytes_s * d.eff.hbm
        lin_f, lin_b, lin_w = self._linears(c, tokens, ep)
        # attention backward: dQ, dK, dV (2x the forward's matmuls), plus recomputing the scores in a flash kernel
        attn_bwd_factor = 2.5 if d.fused_kernels else 2.0
        # elementwise traffic (every non-matmul operator's inputs and outputs), in units of the bytes kept for
        # backward: eager modules move ~8x of them forward and ~12x backward (counted with a dispatch mode over
        # this project's blocks and head, tests/framework/plan); fused kernels (assumption) ~2x and ~4x
        traffic_f, traffic_b = (2.0, 4.0) if d.fused_kernels else (8.0, 12.0)
        host_f, host_b, host_w = self.host_per_op()
        F = lin_f + tokens * (c.attn_flops / attn_f + traffic_f * c.act_bytes / bw) + c.ops * host_f
        recompute = tokens * c.recompute_bytes * 2 / bw
        if d.fused_kernels:  # MLA up-projections run again in backward (V3 §3.2.3)
            recompute += tokens * c.up_proj_flops / gemm
        B = (lin_b + tokens * (c.attn_flops * attn_bwd_factor / attn_b + traffic_b * c.act_bytes / bw) + recompute
             + c.ops * host_b)
        W = lin_w + c.ops * host_w
        if d.logit_s:   # log-softmax and the loss, measured per logit (exponentials, not only traffic)
            F += tokens * c.logits * d.logit_s[0]
            B += tokens * c.logits * d.logit_s[1]
        W += c.zeroed * d.zero_s   # fresh weight-sized gradient buffers zeroed (the embedding's dense V x C)
        return F, B, W

    def host_per_op(self) -> tuple[float, float, float]:
        """(F, B, W) host seconds per forward operator of a layer: measured on the model's own layers where the
        device did (cpu, framework/plan/host.py: module calls, autograd Functions, weight-gradient closures and
        weight-sized buffers included); else the synthetic operator's time, with backward operators ~1.6x the
        forward's (counted: 217 / 135 dense, 264 / 181 MoE), ~1/4 of them in W."""
        d = self.dev
        if d.layer_op_s:
            return tuple(d.layer_op_s)
        return d.op_overhead_s, 1.2 * d.op_overhead_s, 0.4 * d.op_overhead_s

    def _excess(self, ep: int) -> float:
        """The busiest ep rank's share of routed rows above the mean (none without expert parallelism: one rank
        runs every expert on every token)."""
        return self.s.expert_imbalance if ep > 1 else 0.0

    def all_to_all(self, c: LayerCost, tokens: float, ep: int) -> tuple[float, float]:
        """(forward, backward) seconds of the MoE exchanges of part `c` for `tokens` tokens."""
        m, d = self.m, self.dev
        moe_layers = c.moe_blocks
        if ep <= 1 or moe_layers == 0:
            return 0.0, 0.0
        C, K = m.hidden_size, m.num_experts_per_tok
        wide = 2.0 if d.fused_kernels else float(self.s.dtype_bytes)
        dispatch = (1 + 4 / 128) if (self.s.fp8 and self.s.fp8_dispatch) else wide
        nodes = math.ceil(ep / d.gpus_per_node)
        if nodes > 1:   # node-limited: at most topk_group nodes per token, the remote share of them over IB
            remote_nodes = min(m.topk_group if m.n_group > 1 else nodes, nodes) * (nodes - 1) / nodes
            ib_rows, nv_rows = remote_nodes, float(K)
        else:
            ib_rows, nv_rows = 0.0, K * (ep - 1) / ep

        rows = tokens * (1 + self._excess(ep))      # the busiest rank's rows set every exchange's pace

        def exchange(bytes_per_value: float) -> float:
            ib = ib_rows * C * bytes_per_value / (d.ib_bytes_s * d.eff.ib)
            nv = nv_rows * C * bytes_per_value / (d.nvlink_bytes_s * d.eff.nvlink)
            return rows * max(ib, nv) + 2 * d.link_latency_s

        fwd = exchange(dispatch) + exchange(wide)
        bwd = 2 * exchange(wide)
        return moe_layers * fwd, moe_layers * bwd

    def exchanges(self, c: LayerCost, tokens: float, ep: int) -> tuple[float, float, float, float, float]:
        """One MoE block's (dispatch, combine, dispatch backward, combine backward, counts) seconds; all_to_all
        sums the first four over a part's MoE blocks."""
        one = LayerCost(moe=True, moe_blocks=1)
        fwd, bwd = self.all_to_all(one, tokens, ep)
        if fwd == 0.0:
            return 0.0, 0.0, 0.0, 0.0, 0.0
        combine = bwd / 2                                     # BF16 rows, as each backward exchange
        return fwd - combine, combine, combine, combine, 2 * self.dev.link_latency_s

    def block_turns(self, c: LayerCost, tokens: float, ep: int):
        """One MoE block's F&B turns (framework/plan/overlap.py): the shared and routed experts' pieces are their
        matmul time (input gradient = forward FLOPs, weight gradient the same again); the attention pieces hold the
        rest of the block's F, B and W (attention, router, norms, elementwise traffic, recomputation)."""
        from framework.plan.overlap import BlockTurns

        F, B, W = self._compute(c, tokens, ep)
        gemm = self._rates(ep)[0]
        experts = tokens * c.expert_flops * (1 + self._excess(ep)) / gemm
        shared = tokens * c.shared_flops / gemm
        dispatch, combine, dispatch_b, combine_b, counts = self.exchanges(c, tokens, ep)
        return BlockTurns(attn_f=F - shared - experts, shared_f=shared, mlp_f=experts,
                          attn_b=B - shared - experts, shared_b=2 * shared, mlp_b=2 * experts,
                          attn_w=W - shared - experts, dispatch_f=dispatch, combine_f=combine,
                          dispatch_b=dispatch_b, combine_b=combine_b, counts=counts)

    # -- memory -----------------------------------------------------------------------------------------------------
    def memory(self, lay: Layout, parts: list[LayerCost], held: list[list[int]], peak: list[int]) -> Memory:
        s, d = self.s, self.dev
        tokens = lay.micro_batch_size * s.seq_len
        edp = max(1, lay.dp // lay.ep)
        a = s.dtype_bytes
        best: Optional[Memory] = None
        for r, mine in enumerate(held):
            local = [parts[p].params + parts[p].expert_params / lay.ep for p in mine]
            dense = sum(parts[p].params for p in mine)
            expert = sum(parts[p].expert_params for p in mine) / lay.ep
            shard_d, shard_e = (lay.dp, edp) if s.zero else (1, 1)
            state = dense / shard_d + expert / shard_e
            small = sum(parts[p].small_params for p in mine) / shard_d      # small tensors keep fp32 moments
            fp32 = [parts[p].fp32_params for p in mine]                        # the router stays fp32
            mem = Memory(peak_inflight=peak[r], rank=r)
            mem.weights = local[0] * a + fp32[0] * (4 - a)
            mem.second_copy = sum(local[1:]) * a + sum(fp32[1:]) * (4 - a)
            mem.grads = sum(local) * a + sum(fp32) * (4 - a)
            mem.master = 4.0 * (state - sum(fp32) / shard_d) if a != 4 else 0.0
            mem.moments = (state - small) * sum(moment_bytes(f) for f in s.moments) + small * 8.0
            mem.activations = peak[r] * tokens * max(parts[p].act_bytes for p in mine)
            mem.workspace = tokens * max(parts[p].act_bytes for p in mine)
            one_layer = max((b.recompute_bytes for b in self.blocks), default=0.0)
            mem.recompute = tokens * one_layer
            act_msg = tokens * self.m.hidden_size * (2 if d.fused_kernels else a)
            mem.comm_buffers = 4 * act_msg if lay.pp > 1 else 0.0          # p2p send + receive, both directions
            if lay.ep > 1:   # two chunks' dispatch (FP8 or BF16) and combine (BF16) rows in flight (F&B pairs)
                mem.comm_buffers += 2 * tokens * self.m.num_experts_per_tok * self.m.hidden_size * (1 + 2)
            if s.zero and lay.dp > 1:   # ZeRO-1's flat reduce-scatter buffer, one bucket of at most 2^26 values
                mem.comm_buffers += 4.0 * min(sum(local), 2**26)
            mem.runtime = d.runtime_bytes
            if best is None or mem.total > best.total:
                best = mem
        return best

    # -- the whole plan ---------------------------------------------------------------------------------------------
    def plan(self, lay: Layout) -> Plan:
        from schedules import get_layout
        from schedules.simulate import Costs, simulate

        s, d = self.s, self.dev
        parts = self.parts(lay.layers_per_part)
        name = "1f1b" if lay.pp == 1 else lay.schedule      # one stage: micro-batches one after another
        sched = get_layout(name, lay.pp)
        held = [sorted({sched.stage_to_part[st] for st in sched.stages_of(r)}) for r in range(lay.pp)]
        actions = _actions(name, lay.pp, lay.micro_batches)
        from schedules.verify import peak_activations
        peak = [peak_activations(acts) for acts in actions]
        plan = Plan(lay, self.memory(lay, parts, held, peak), d.memory_bytes)

        tokens = lay.micro_batch_size * s.seq_len
        costs = [self._compute(c, tokens, lay.ep) for c in parts]
        comms = [self.all_to_all(c, tokens, lay.ep) for c in parts]
        overlap = s.overlap and lay.schedule in ("dualpipe", "dualpipev")
        exposed = [self._pair_exposed(c, tokens, lay.ep) if overlap else a[0] + a[1] for c, a in zip(parts, comms)]
        pair = [c[0] + c[1] + e for c, e in zip(costs, exposed)]
        # simulate() takes one cost per action for every stage: a rank's mean over the parts it holds (a DualPipe
        # rank runs as many chunks of each), and the busiest rank's, since the pipeline goes at its pace
        def per_rank(values):
            return max(sum(values[p] for p in mine) / len(mine) for mine in held)
        F = per_rank([c[0] + a[0] for c, a in zip(costs, comms)])
        B = per_rank([c[1] + a[1] for c, a in zip(costs, comms)])
        W = per_rank([c[2] for c in costs])
        FB = per_rank(pair)
        act_msg = tokens * self.m.hidden_size * (2 if d.fused_kernels else s.dtype_bytes)
        cross_node = s.gpus > d.gpus_per_node
        link = d.ib_bytes_s * d.eff.ib if cross_node else d.nvlink_bytes_s * d.eff.nvlink
        p2p = d.link_latency_s + act_msg / link if lay.pp > 1 else 0.0
        # the executor's own time per action (cpu: measured; a GPU's host queues kernels ahead of the device)
        h = d.action_overhead_s
        F, B, W, FB = F + h, B + h, W + h, FB + h
        plan.F, plan.B, plan.W, plan.FB = F, B, W, FB
        sim = simulate(actions, sched, Costs(F=F, B=B, W=W, FB=FB, p2p=p2p))
        plan.sim = sim
        plan.pipeline_s = sim.makespan
        worst = max(range(lay.pp), key=lambda r: sim.bubble[r])
        plan.bubble = sim.bubble_ratio[worst]
        plan.a2a_total, plan.a2a_exposed = self._a2a_per_step(actions[worst], comms, max(exposed))
        plan.grad_sync_s = self._grad_sync(lay, parts, held)
        plan.optimizer_s = self._optimizer(lay, parts, held)
        plan.bookkeeping_s = self._bookkeeping(parts, held, lay.ep)
        plan.step_s = plan.pipeline_s + plan.grad_sync_s + plan.optimizer_s + plan.bookkeeping_s
        tokens_step = s.global_batch_size * s.seq_len
        plan.tokens_per_s = tokens_step / plan.step_s
        from framework.plan.layers import flops_per_token
        plan.mfu = flops_per_token(self.m, s.seq_len) * plan.tokens_per_s / (s.gpus * d.bf16_flops)
        plan.gpu_hours_per_T = s.gpus * 1e12 / plan.tokens_per_s / 3600.0
        return plan

    def _pair_exposed(self, c: LayerCost, tokens: float, ep: int) -> float:
        """Seconds of part `c`'s exchanges an F&B pair leaves exposed (framework/plan/overlap.py, counts layout)."""
        from framework.plan.overlap import exposed

        if c.moe_blocks == 0 or ep <= 1:
            return 0.0
        return exposed(c.moe_blocks, self.block_turns(self.moe_block, tokens, ep))

    def _a2a_per_step(self, actions, comms, pair_exposed: float) -> tuple[float, float]:
        aF = max(a[0] for a in comms)
        aB = max(a[1] for a in comms)
        total = exposed = 0.0
        for act in actions:
            if act.op == "F":
                total, exposed = total + aF, exposed + aF
            elif act.op in ("B", "BW"):
                total, exposed = total + aB, exposed + aB
            elif act.op == "FB":
                total += aF + aB
                exposed += pair_exposed
        return total, exposed

    def _grad_sync(self, lay: Layout, parts, held) -> float:
        """Gradient exchange after the pipeline, not overlapped: DualPipe's mirror copies summed (an all-reduce
        between two ranks), then data parallel (ZeRO-1: reduce-scatter + all-gather; else all-reduce), dense
        parameters over dp ranks and experts over dp / ep."""
        s, d = self.s, self.dev
        a = s.dtype_bytes
        mine = held[0]
        dense = sum(parts[p].params for p in mine)
        expert = sum(parts[p].expert_params for p in mine) / lay.ep
        cross_node = s.gpus > d.gpus_per_node
        bw = (d.ib_bytes_s * d.eff.ib) if cross_node else (d.nvlink_bytes_s * d.eff.nvlink)
        t = 0.0
        if lay.schedule == "dualpipe" and lay.pp > 1:
            t += (dense + expert) * a / bw + d.link_latency_s
        for n, group in ((dense, lay.dp), (expert, max(1, lay.dp // lay.ep))):
            if group > 1:
                t += 2 * (group - 1) / group * n * a / bw + 2 * d.link_latency_s * math.log2(group)
        return t

    def _optimizer(self, lay: Layout, parts, held) -> float:
        """AdamW is memory-bound: each state value read and written once, each weight written once; plus, on cpu,
        the host time of the eager operators (about 15 per parameter tensor: the update, clipping, zeroing)."""
        s, d = self.s, self.dev
        mine = held[0]
        local = sum(parts[p].params + parts[p].expert_params / lay.ep for p in mine)
        shard = lay.dp if s.zero else 1
        state_bytes = (4.0 if s.dtype_bytes != 4 else 0.0) + 4.0 + sum(moment_bytes(f) for f in s.moments)
        t = (2 * local / shard * state_bytes + 2 * local * s.dtype_bytes) / (d.hbm_bytes_s * d.eff.hbm)
        t += 15 * sum(parts[p].tensors for p in mine) * d.op_overhead_s
        return t

    def _bookkeeping(self, parts, held, ep: int) -> float:
        """The trainer's per-step work outside the pipeline and the optimizer, on the rank with the most of it:
        its small all-reduces (one measured all-reduce each on cpu; else a tree of 2 link latencies per level, none
        on one device), the host time of its per-tensor and per-MoE-layer operators and the gradient norm's
        traffic (the constants above)."""
        d, gpus = self.dev, self.s.gpus
        moe = any(c.moe_blocks for c in parts)
        syncs = TRAINER_SYNCS_MOE if moe else TRAINER_SYNCS_DENSE
        sync = 0.0 if gpus <= 1 else (d.allreduce_s or 2 * d.link_latency_s * math.ceil(math.log2(gpus)))
        host = max(d.op_overhead_s * (OPS_PER_TENSOR * sum(parts[p].tensors for p in mine)
                                      + OPS_PER_MOE_LAYER * sum(parts[p].moe_blocks for p in mine))
                   + NORM_BYTES_PER_PARAM * sum(parts[p].params + parts[p].expert_params / ep for p in mine)
                   / (d.hbm_bytes_s * d.eff.hbm) for mine in held)
        return syncs * sync + host


@lru_cache(maxsize=64)
def _actions(schedule: str, pp: int, micro_batches: int):
    from schedules import build
    return build(schedule, pp, micro_batches)
