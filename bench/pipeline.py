"""Pipeline schedules against their peers, on 2 CPU processes, and the simulator's projection to deeper pipelines.

Contenders, all on the same model, the same micro-batches and the same optimizer, in ONE run:
  ours    1F1B, ZB1P, DualPipe, DualPipeV (schedules.PipelineExecutor, traced)
  torch   torch.distributed.pipelining Schedule1F1B and ScheduleDualPipeV
  DeepSpeed  deepspeed.pipe.PipelineModule (1F1B TrainSchedule) and DualPipeVModule
Steps are interleaved (one step of each contender per round, the order rotating every round), so the drift of a
shared machine's load falls on all of them alike. Every contender's computations are traced: ours by the executor,
the peers by timing the methods that run one chunk (bench/_pipeline_peers.py).

Equal work. The model is a stack of L identical residual MLP blocks (h + W2 gelu(W1 h)); a step is N micro-batches
of [b, s, D] through all L blocks, forward and backward, then one AdamW step. So every contender does the same
model FLOPs on the same global batch. Layouts differ only in where blocks sit:
  1F1B-like (ours 1F1B, ZB1P; torch 1F1B; DeepSpeed 1F1B)  2 stages of L/2 blocks, one per rank
  DualPipe   2 parts of L/2 blocks; rank r holds part r (direction 0) AND a copy of part 1-r (direction 1), N/2
             micro-batches enter at each end: same FLOPs per rank, twice the parameters, plus the exchange that sums
             the two copies' gradients (schedules/mirror.py: each part's exchange starts when this rank's copy is
             final, under the rest of the step) and an AdamW step over both copies; both are in its step time
  DualPipeV  4 parts of L/4 blocks in a V: rank r holds parts r and 3-r, one copy of the parameters

    python -m bench.pipeline [--blocks 8 --hidden 256 --ffn 1024 --batch 4 --seq 64 --microbatches 8 --steps 30]
"""
from __future__ import annotations

import argparse
import copy
import os
import pickle
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from fractions import Fraction
from typing import Optional

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from bench._pipeline_peers import PEER_NAMES, PEERS, Timed, build_peer
from bench.common import OUT, machine, write_report
from parallel.exchanges import ping_pong_s
from parallel.mesh import free_port

OURS = ("1f1b", "zb1p", "dualpipe", "dualpipev")
OUR_NAMES = {"1f1b": "ours 1F1B", "zb1p": "ours ZB1P", "dualpipe": "ours DualPipe", "dualpipev": "ours DualPipeV"}
PROJECT_PP = (8, 16, 32)
LR = 1e-4


class Block(nn.Module):
    """One residual MLP block: the unit every contender cuts its stages from."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)

    def forward(self, h):                       # h: [b, s, D]
        return h + self.down(F.gelu(self.up(h)))


def make_blocks(a) -> list[Block]:
    torch.manual_seed(0)
    return [Block(a.hidden, a.ffn) for _ in range(a.blocks)]


def make_micro_batches(a) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(a.batch, a.seq, a.hidden, generator=g), torch.randn(a.batch, a.seq, a.hidden, generator=g))
            for _ in range(a.microbatches)]


# ---------------------------------------------------------------- our schedules
class Ours(Timed):
    """One of our schedules through PipelineExecutor, with the executor's own trace."""

    def __init__(self, schedule: str, blocks: list[nn.Module], micro_batches: list, lr: float):
        super().__init__()
        import torch.distributed as dist

        from schedules import build, get_layout
        from schedules.executor import PipelineExecutor
        from parallel.mesh import pair_groups
        from schedules.mirror import build_mirror_exchange, duplicated_parts
        from schedules.verify import microbatches_of
        from schedules.weight_grad import enable_weight_grad_split

        self.name, self.framework, self.schedule = OUR_NAMES[schedule], "duet schedules", schedule
        rank, pp, n = dist.get_rank(), dist.get_world_size(), len(micro_batches)
        self.layout = get_layout(schedule, pp)
        self.actions = build(schedule, pp, n)[rank]
        per = len(blocks) // self.layout.num_parts
        self.parts = {}
        for s in self.layout.stages_of(rank):
            p = self.layout.stage_to_part[s]
            self.parts[s] = nn.Sequential(*(copy.deepcopy(b) for b in blocks[p * per:(p + 1) * per]))
            if schedule != "1f1b":      # the schedules with a B/W split defer weight gradients to W actions
                enable_weight_grad_split(self.parts[s])
        self.executor = PipelineExecutor(self.layout, self.parts, criterion=lambda out, y: F.mse_loss(out, y) / n,
                                         p2p_shapes=[micro_batches[0][0].shape], p2p_dtype=torch.float32)
        first = {mb for s in self.parts if self.layout.is_first(s) for mb in microbatches_of(self.layout, s, n)}
        last = {mb for s in self.parts if self.layout.is_last(s) for mb in microbatches_of(self.layout, s, n)}
        self.inputs = {mb: (micro_batches[mb][0],) for mb in first}
        self.labels = {mb: (micro_batches[mb][1],) for mb in last}
        self.n = n
        # DualPipe: each part's copies are summed as soon as this rank's copy is final, under the rest of the step
        groups = pair_groups([list(range(pp))], duplicated_parts(self.layout))
        self.mirror = build_mirror_exchange(self.parts, self.layout, groups)
        params = list({id(p): p for m in self.parts.values() for p in m.parameters()}.values())
        self.opt = torch.optim.AdamW(params, lr=lr)
        self.comm: list = []

    def step(self) -> tuple[float, int]:
        from schedules.actions import Action

        self.clear()
        res = self.executor.run(self.actions, self.n, self.inputs, self.labels, trace=True,
                                grads_ready=self.mirror.stage_done if self.mirror else None)
        t = time.time()
        if self.mirror is not None:                   # DualPipe: wait for the sums of the two copies
            self.mirror.finish()
        self.sync_s = time.time() - t
        t = time.time()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.opt_s = time.time() - t
        t0 = res.start_time
        self.spans = [(t0 + s, t0 + e, a) for s, e, a in res.trace if isinstance(a, Action)]
        self.comm = [(t0 + s, t0 + e, a) for s, e, a in res.trace if isinstance(a, str)]
        # the criterion divides by n (gradient of the mean): undo it for the loss report
        return float(sum(float(v) for v in res.losses.values())) * self.n, len(res.losses)


# ---------------------------------------------------------------- the measured run (2 processes)
def _worker(rank: int, port: int, a, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=a.timeout))
    blocks, micro_batches = make_blocks(a), make_micro_batches(a)
    p2p_s = ping_pong_s(torch.zeros(micro_batches[0][0].shape), rounds=20, warmup=2)

    specs = [("ours", s) for s in OURS] + ([] if a.no_peers else list(PEERS))
    if a.only:
        specs = [sp for sp in specs if f"{sp[0]}:{sp[1]}" in a.only]
    contenders, failed = [], {}
    for framework, schedule in specs:
        name = OUR_NAMES[schedule] if framework == "ours" else PEER_NAMES[(framework, schedule)]
        if a.verbose:
            print(f"rank {rank} builds {name}", flush=True)
        try:
            c = (Ours(schedule, blocks, micro_batches, LR) if framework == "ours"
                 else build_peer(framework, schedule, blocks, micro_batches, LR))
            err = None
        except Exception as e:  # a peer that cannot run gets a row saying why
            c, err = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
        errs = [None, None]
        dist.all_gather_object(errs, err)
        if any(errs):
            failed[name] = next(e for e in errs if e)
        else:
            contenders.append(c)
        torch.set_num_threads(1)

    records = {c.name: [] for c in contenders}
    timed, started = 0, time.time()
    for i in range(a.warmup + a.steps):
        # a loaded machine can make steps several times slower: stop timing once the budget is spent (rank 0 decides,
        # so both ranks stop at the same round), keeping at least 5 timed rounds
        stop = [timed >= 5 and time.time() - started > a.budget]
        dist.broadcast_object_list(stop, src=0)
        if stop[0]:
            break
        timed += i >= a.warmup
        k = i % len(contenders)
        for c in contenders[k:] + contenders[:k]:        # rotate the order every round
            if c.name in failed:
                continue
            err, rec = None, None
            if a.verbose:
                print(f"rank {rank} step {i} {c.name}", flush=True)
            try:
                t0 = time.time()
                loss_sum, count = c.step()
                t1 = time.time()
                rec = dict(t0=t0, t1=t1, opt_s=c.opt_s, sync_s=c.sync_s, spans=c.spans, comm=getattr(c, "comm", []),
                           loss_sum=loss_sum, count=count, warm=i < a.warmup)
            except Exception as e:
                err = f"failed at step {i}: {type(e).__name__}: {e}".splitlines()[0][:300]
            errs = [None, None]
            dist.all_gather_object(errs, err)   # also the point where both ranks line up before the next step
            if any(errs):
                failed[c.name] = next(e for e in errs if e)
            else:
                records[c.name].append(rec)
    gathered = [None, None]
    dist.all_gather_object(gathered, records)
    if rank == 0:
        meta = dict(order=[c.name for c in contenders], failed=failed, p2p_s=p2p_s, load=(a.load0, os.getloadavg()[0]),
                    timed=timed,
                    frameworks={c.name: c.framework for c in contenders})
        with open(out_path, "wb") as f:
            pickle.dump(dict(records=gathered, meta=meta), f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- analysis
def steps_of(records: list[dict], name: str) -> list[list[dict]]:
    """[step][rank] records of the timed steps of one contender, in round order."""
    per_rank = [r.get(name, []) for r in records]
    count = min(len(x) for x in per_rank)
    return [[per_rank[0][i], per_rank[1][i]] for i in range(count) if not per_rank[0][i]["warm"]]


def step_time(ranks: list[dict]) -> float:
    """A step lasts from the first rank's start to the last rank's end."""
    return max(r["t1"] for r in ranks) - min(r["t0"] for r in ranks)


def compute_window(ranks: list[dict]) -> float:
    """From the first computation's start to the last one's end, over both ranks."""
    spans = [sp for r in ranks for sp in r["spans"]]
    return max(e for _, e, _ in spans) - min(s for s, _, _ in spans)


def step_stats(steps: list[list[dict]]) -> dict:
    """Medians over the timed steps: step time, compute window, gradient exchange + optimizer, bubble per rank,
    and the part of each rank's idle time spent waiting on communication handles (our executor's trace only)."""
    from schedules.timeline import measured_bubble

    med = statistics.median
    step_s, window_s, post_s, bubbles, waits = [], [], [], [], []
    for ranks in steps:
        step_s.append(step_time(ranks))
        post_s.append(max(r["opt_s"] + r.get("sync_s", 0.0) for r in ranks))
        timelines = [r["spans"] for r in ranks]
        starts, ends = [s for tl in timelines for s, _, _ in tl], [e for tl in timelines for _, e, _ in tl]
        lo, hi = min(starts), max(ends)
        window_s.append(hi - lo)
        bubbles.append(measured_bubble(timelines))
        # waits clipped to the compute window (the final wait for sends comes after it)
        waits.append([sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, _ in r.get("comm", [])) for r in ranks])
    return dict(step_s=med(step_s), fastest_s=min(step_s), window_s=med(window_s), post_s=med(post_s),
                bubble=[med(b[r] for b in bubbles) for r in range(2)],
                bubble_s=[med(b[r] * w for b, w in zip(bubbles, window_s)) for r in range(2)],
                wait_s=[med(w[r] for w in waits) for r in range(2)],
                median_step=sorted(range(len(step_s)), key=step_s.__getitem__)[len(step_s) // 2])


def paired_ratio(records: list[dict], name: str, ref: str, measure=step_time) -> float:
    """Median over rounds of (this contender's step / the reference's step in the same round): neighbouring steps
    share the machine's load of that moment, so the ratio cancels its drift better than a ratio of medians."""
    ratios = [measure(a) / measure(b) for a, b in zip(steps_of(records, name), steps_of(records, ref))]
    return statistics.median(ratios)


def op_of(label) -> str:
    from schedules.timeline import _parse

    return _parse(label)[0]


def action_costs(steps: list[list[dict]]) -> dict[str, float]:
    """Median seconds of each kind of computation (F, B, W, BW, FB) over the timed steps and both ranks."""
    by_op: dict[str, list[float]] = {}
    for ranks in steps:
        for r in ranks:
            for s, e, label in r["spans"]:
                by_op.setdefault(op_of(label), []).append(e - s)
    return {op: statistics.median(v) for op, v in by_op.items()}


def pooled_costs(records: list[dict], names: list[str]) -> dict[str, float]:
    """Per-op medians pooled over several of our schedules that share a stage size."""
    return action_costs([ranks for name in names for ranks in steps_of(records, name)])


def to_costs(c: dict[str, float], p2p_s: float = 0.0):
    """simulate.Costs in integer microseconds (exact fractions stay small). A measured FB pair is F + B + W
    (DualPipe's pairs run the full backward); simulate's FB is the pair without its W."""
    from schedules.simulate import Costs

    us = lambda v: max(0, round(v * 1e6))
    W = us(c.get("W", c["BW"] / 2))
    B = us(c["B"]) if "B" in c else us(c["BW"]) - W
    FB = us(c["FB"]) - W if "FB" in c else None
    return Costs(F=us(c["F"]), B=B, W=W, BW=us(c["BW"]), FB=FB, p2p=us(p2p_s))


def simulate_rows(name: str, pp: int, n: int, costs) -> dict:
    """simulate() of a schedule, in seconds: per-rank bubble and ratio, the worst rank, makespan, table formula."""
    from schedules import build, get_layout, simulate
    from schedules.simulate import bubble_table

    r = simulate(build(name, pp, n), get_layout(name, pp), costs)
    worst = max(range(pp), key=lambda i: r.bubble[i])
    return dict(bubble=[b / 1e6 for b in r.bubble], ratio=r.bubble_ratio, worst=worst,
                makespan=r.makespan / 1e6, table=bubble_table(name, pp, costs) / 1e6)


def save_pictures(steps: list[list[dict]], index: int) -> tuple[str, str]:
    from schedules.timeline import draw_gantt, to_chrome_trace

    ranks = steps[index]
    timelines, comm = [r["spans"] for r in ranks], [r["comm"] for r in ranks]
    OUT.mkdir(exist_ok=True)
    png, trace = OUT / "pipeline_timeline.png", OUT / "pipeline_trace.json"
    draw_gantt(timelines, str(png), title="ours DualPipe, 2 CPU processes, measured step of median length",
               comm=comm)
    to_chrome_trace(timelines, str(trace), comm=comm)
    return png.name, trace.name


def first_loss(records: list[dict], name: str) -> Optional[float]:
    """Mean micro-batch loss of a contender's first step (before any update: the same for every contender)."""
    ranks = [r[name][0] for r in records if r.get(name)]
    count = sum(r["count"] for r in ranks)
    return sum(r["loss_sum"] for r in ranks) / count if count else None


ms = lambda v: f"{1e3 * v:.1f}"
pct = lambda v: f"{100 * v:.1f}%"


def _contender_table(a, records, meta, order, stats) -> list[str]:
    ref = OUR_NAMES["dualpipe"]
    held = {"1F1B": f"{a.blocks // 2}", "DualPipeV": f"{a.blocks // 2}", "DualPipe": f"{a.blocks} (2 copies)"}
    lines = ["| contender | framework | blocks / rank | ms / step | fastest step ms | vs ours DualPipe | "
             "compute window ms | grad exchange + AdamW ms | bubble rank 0 | bubble rank 1 | first-step loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        st = stats[name]
        kind = "DualPipeV" if "DualPipeV" in name else "DualPipe" if "DualPipe" in name else "1F1B"
        loss = first_loss(records, name)
        rel = f"{paired_ratio(records, name, ref):.3f}" if ref in stats else "-"
        lines.append(f"| {name} | {meta['frameworks'][name]} | {held[kind]} | {ms(st['step_s'])} | "
                     f"{ms(st['fastest_s'])} | {rel} | {ms(st['window_s'])} | {ms(st['post_s'])} | "
                     f"{pct(st['bubble'][0])} ({ms(st['bubble_s'][0])} ms) | "
                     f"{pct(st['bubble'][1])} ({ms(st['bubble_s'][1])} ms) | "
                     f"{'-' if loss is None else f'{loss:.6f}'} |")
    for name, why in meta["failed"].items():
        lines.append(f"| {name} | - | - | failed: {why} | - | - | - | - | - | - | - |")
    return lines


def report(a, data: dict, argv) -> str:
    records, meta = data["records"], data["meta"]
    order = [n for n in meta["order"] if steps_of(records, n)]    # a contender that failed early has no timed step
    p2p_s = meta["p2p_s"]
    stats = {name: step_stats(steps_of(records, name)) for name in order}
    ref = OUR_NAMES["dualpipe"]
    load = meta.get("load", (float("nan"),) * 2)
    losses = [v for v in (first_loss(records, n) for n in order) if v is not None]
    spread = (max(losses) - min(losses)) / abs(min(losses)) if losses else float("nan")

    lines = ["## Pipeline schedules against their peers (bench/pipeline.py)\n",
             f"2 processes x 1 thread, gloo. Model: {a.blocks} residual MLP blocks (hidden {a.hidden}, ffn {a.ffn}), "
             f"fp32. A step = {a.microbatches} micro-batches of [{a.batch}, {a.seq}, {a.hidden}] forward + backward, "
             f"then AdamW (lr {LR:g}): {a.microbatches * a.batch * a.seq} tokens and the same model FLOPs per step for "
             f"every contender. {meta.get('timed', a.steps)} timed steps after {a.warmup} warm-up steps, contenders "
             f"interleaved (one step "
             f"each per round, the order rotating). 1-minute load average of the machine ({os.cpu_count()} cores): "
             f"{load[0]:.1f} at the start, {load[1]:.1f} at the end"
             + (": other jobs shared the cores, so single steps vary a lot.\n" if max(load) > os.cpu_count() + 1
                else ".\n")]
    lines += _contender_table(a, records, meta, order, stats)
    lines.append(
        "\nms / step: median step, first rank's start to last rank's end, including the gradient exchange of "
        "DualPipe's two copies (schedules.mirror: waited for after the pipeline, started as each part finishes) and AdamW. vs ours DualPipe: median over rounds of the step "
        "time ratio within a round (< 1: faster than ours DualPipe). Compute window: first computation's start "
        "to last one's end over both ranks. Bubble of a rank: idle time in that window / window "
        "(schedules.measured_bubble over the traced computations; waits, communication and framework bookkeeping "
        "count as idle). Our executor traces itself; the peers are traced by wrapping "
        "PipelineStage.forward_one_chunk / backward_one_chunk / backward_weight_one_chunk (torch) and the engine's "
        "ForwardPass / BackwardPass / OptimizerStep instructions (DeepSpeed). First-step losses (same initial weights, "
        f"same data) agree within a relative {spread:.1e}.\n")
    lines.append(
        "Equal work: every contender runs the same blocks on the same micro-batches. 1F1B-like layouts put "
        f"{a.blocks // 2} blocks on each rank; DualPipe cuts the model in 2 parts and rank r holds part r "
        "(direction 0) and a copy of part 1-r (direction 1), each direction carrying half of the micro-batches, so "
        "it does the same FLOPs per rank but holds, exchanges (schedules.mirror) and updates twice the parameters; "
        f"DualPipeV cuts 4 parts of {a.blocks // 4} blocks, rank r holding parts r and 3-r (one copy). DeepSpeed "
        "has no weight-gradient split (its BackwardPass is a full backward); torch's DualPipeV runs its F&B pairs "
        "one after the other, as ours does on CPU (no overlap hook).\n")

    costs_2 = pooled_costs(records, [OUR_NAMES[s] for s in ("1f1b", "zb1p", "dualpipe") if OUR_NAMES[s] in stats])
    costs_dp = action_costs(steps_of(records, ref)) if ref in stats else {}
    costs_v = action_costs(steps_of(records, OUR_NAMES["dualpipev"])) if OUR_NAMES["dualpipev"] in stats else {}
    lines += ["Per-action costs measured from our traces (median ms; F&B = an overlapped pair with a full backward, "
              "run here as forward then backward):\n",
              "| stage | F | B (input grad) | W (weight grad) | BW (full backward) | F&B |",
              "|---|---|---|---|---|---|"]
    for label, c in ((f"{a.blocks // 2} blocks: 1F1B, ZB1P, DualPipe pooled", costs_2),
                     (f"{a.blocks // 2} blocks: DualPipe alone", costs_dp),
                     (f"{a.blocks // 4} blocks: DualPipeV", costs_v)):
        if c:
            lines.append(f"| {label} | " + " | ".join(ms(c[k]) if k in c else "-" for k in ("F", "B", "W", "BW", "FB"))
                         + " |")
    lines.append(f"\nOne micro-batch activation from rank to rank (ping-pong / 2, idle machine moments): "
                 f"{1e3 * p2p_s:.2f} ms.\n")

    checks = []
    if costs_dp:
        st = stats[ref]
        sims = [("simulated, p2p = 0", simulate_rows("dualpipe", 2, a.microbatches, to_costs(costs_dp))),
                (f"simulated, p2p = {1e3 * p2p_s:.2f} ms",
                 simulate_rows("dualpipe", 2, a.microbatches, to_costs(costs_dp, p2p_s)))]
        lines += ["DualPipe on PP=2, measured against simulate() with its own measured per-action costs "
                  "(bubble = window - busy time of the rank):\n",
                  "| | bubble rank 0 ms | bubble rank 1 ms | compute window ms |", "|---|---|---|---|"]
        for label, s in sims:
            lines.append(f"| {label} | {ms(s['bubble'][0])} | {ms(s['bubble'][1])} | {ms(s['makespan'])} |")
        lines.append(f"| measured (median step) | {ms(st['bubble_s'][0])} | {ms(st['bubble_s'][1])} | "
                     f"{ms(st['window_s'])} |")
        lines.append(f"| of which waiting on communication handles | {ms(st['wait_s'][0])} | {ms(st['wait_s'][1])} "
                     f"| |")
        sim = sims[1][1]
        gap = max(abs(st["bubble_s"][r] - sim["bubble"][r]) for r in range(2))
        rel = gap / max(sim["bubble"]) if max(sim["bubble"]) > 0 else float("inf")
        checks.append(
            f"- DualPipe's measured bubble within 10% of its simulated bubble: {'MET' if rel <= 0.10 else 'NOT MET'}. "
            f"Largest gap {ms(gap)} ms against a simulated bubble of {ms(max(sim['bubble']))} ms (the table's "
            f"(PP/2-1)(F&B+B-3W) is 0 at PP=2); the gap is {100 * gap / st['window_s']:.1f}% of the compute "
            f"window. The simulator counts computations only: the measured idle time is the executor's work between "
            f"computations (posting p2p, releasing sent activations), waits, and the other jobs on the cores.")
    if ref in stats:
        peers = [n for n in order if not n.startswith("ours")]
        ratios = {n: paired_ratio(records, n, ref) for n in peers}
        faster = [f"{n} ({ratios[n]:.3f})" for n in peers if ratios[n] < 1.0]
        windows = {n: paired_ratio(records, n, ref, measure=compute_window) for n in peers}
        checks.append(f"- Our DualPipe no slower than any peer at equal work (per-round step ratio peer / ours >= 1): "
                      + (f"NOT MET, faster: {', '.join(faster)}." if faster else f"MET against the {len(peers)} "
                         f"peers that ran.")
                      + " The same ratio over the compute window alone (the schedule, without the gradient exchange "
                      "and the optimizer): " + ", ".join(f"{n} {windows[n]:.3f}" for n in peers) + ".")

    if costs_2 and costs_v:
        from schedules import get_layout

        c2, cv = to_costs(costs_2), to_costs(costs_v)
        lines += ["\nProjection with simulate() (zero p2p latency) from the measured per-action costs: every stage "
                  f"keeps the pooled costs of {a.blocks // 2} blocks (DualPipeV: its own, {a.blocks // 4} blocks: its "
                  "stages are half as deep for the same model), N = 4 x PP micro-batches. Bubble = makespan - busy "
                  "time of the worst rank; ratio = bubble / makespan; table = the DualPipe README / V3 Table 2 "
                  "formula with the same costs (B = full backward, F&B = forward + full backward pair).\n",
                  "| schedule | PP | N | bubble ms (worst rank) | bubble ratio | table formula | table ms | step ms | "
                  "share of the parameters / device |", "|---|---|---|---|---|---|---|---|---|"]
        formula = {"1f1b": "(PP-1)(F+B)", "zb1p": "(PP-1)(F+B-2W)", "dualpipe": "(PP/2-1)(F&B+B-3W)",
                   "dualpipev": "(PP/2-1)(F&B+B-3W), PP = 2 x devices"}
        for pp in PROJECT_PP:
            for name in OURS:
                s = simulate_rows(name, pp, 4 * pp, cv if name == "dualpipev" else c2)
                lay = get_layout(name, pp)
                share = Fraction(max(len(lay.stages_of(r)) for r in range(pp)), lay.num_parts)
                lines.append(f"| {name} | {pp} | {4 * pp} | {ms(s['bubble'][s['worst']])} | "
                             f"{s['ratio'][s['worst']]:.3f} | {formula[name]} | {ms(s['table'])} | "
                             f"{ms(s['makespan'])} | {share} |")
    png, trace = save_pictures(steps_of(records, ref), stats[ref]["median_step"]) if ref in stats else ("-", "-")
    lines += ["\nGoal checks (reported, not asserted):\n"] + checks
    lines.append(f"\nOurs DualPipe, the step of median length: bench/out/{png} (Gantt), bench/out/{trace} (Chrome "
                 "trace with the communication waits).")
    command = " ".join(["python -m bench.pipeline", *argv])
    lines.append(f"\nCommand: `{command}`; machine: {machine()} per process.")
    text = "\n".join(lines)
    write_report("pipeline", text)
    return text


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8, help="MLP blocks in the model (a multiple of 4)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (even, >= 4)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--budget", type=float, default=360.0,
                   help="seconds of stepping after which timing stops early (at least 5 timed rounds)")
    p.add_argument("--timeout", type=int, default=120, help="seconds before a stuck communication fails the run")
    p.add_argument("--no-peers", action="store_true", help="only our schedules")
    p.add_argument("--only", nargs="*", default=None,
                   help="contenders to run, as framework:schedule (ours:dualpipe, torch:1f1b, deepspeed:dualpipev)")
    p.add_argument("--verbose", action="store_true", help="print each step as it starts")
    p.add_argument("--save-records", default=None, help="also pickle the raw per-step records to this path")
    a = p.parse_args(argv)
    if a.blocks < 4 or a.blocks % 4:
        raise ValueError(f"--blocks={a.blocks}: must be a positive multiple of 4 (DualPipeV cuts 4 parts)")
    if a.microbatches < 4 or a.microbatches % 2:
        raise ValueError(f"--microbatches={a.microbatches}: must be even and >= 4 (DualPipe on 2 ranks)")
    for k in ("hidden", "ffn", "batch", "seq", "steps"):
        if getattr(a, k) < 1:
            raise ValueError(f"--{k}={getattr(a, k)}: must be >= 1")
    return a


def main(argv=None) -> str:
    a = parse(argv)
    a.load0 = os.getloadavg()[0]
    torch.set_num_threads(1)
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.pkl")
        mp.spawn(_worker, args=(free_port(), a, path), nprocs=2, join=True)
        with open(path, "rb") as f:
            data = pickle.load(f)
    if a.save_records:
        with open(a.save_records, "wb") as f:
            pickle.dump(data, f)
    text = report(a, data, sys.argv[1:] if argv is None else list(argv))
    print(f"bench.pipeline: {time.time() - t:.0f} s", flush=True)
    return text


if __name__ == "__main__":
    main()
