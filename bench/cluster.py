"""An emulated cluster: the real executor and real gloo p2p at PP 4-16 on 2 cores, stages that only take time.

Each rank is its own process (gloo, one thread). A stage's F, B and W take a fixed time on an emulated device without
occupying a core, inside a custom autograd function, so the executor runs the schedule exactly as it would with a
model - F through autograd, B computing the input gradient and leaving its weight-gradient closure in
WeightGradStore (weight_grad.py), W running that closure, BW running both. An F&B action goes through the stage's
`overlapped_forward_backward` hook, which runs the forward and the backward with their own costs off and takes the
pair's once (F&B - W, plus W when the pair's backward is full), as a stage that overlaps them would.

Two devices (`Device`):
  sync   the host sleeps each cost: the executor's own work and the computations take turns, as on a CPU
  async  a stream, as a GPU runs one: the host launches and runs ahead (a bounded launch queue); a computation starts
         once launched, once the stream is free and once its input is there - the end of the action before the SEND
         that carried it, stamped into the tensor, plus the link - and lasts exactly its cost. The executor's own
         work overlaps the computations and shows only where a stream ran dry waiting for its host.

Two sets of costs:
  table  V3 Table 2's example: F = 1, B (full backward) = 2, W = 1, F&B = 2.5 units of --unit-ms
  tiny   F, B, W and F&B measured once, in this process, on a real pipeline stage of deepseek_v3_tiny (one MoE layer,
         the stage PP=4 gives each rank) with the weight-gradient split the trainer applies

Bubble means what schedules/simulate.py means: on every rank, the step's makespan (first computation's start to
the last computation's end over ALL ranks) minus the time this rank spent in computations. The measured bubble
is the same quantity over the computations' spans (sync: the executor's traced actions; async: the device's).
On the sync device simulate() is fed, from the same run, the mean duration of each kind of action (sleep overshoot
and the autograd work inside an action are in it; means, not medians, since delays add up along the critical path)
and the mean p2p latency as simulate() defines it (from the end of the computation a SEND follows to the end of the
receiver's wait); the executor's work between actions is measured per action, and a second simulation charges it to
every action. On the async device simulate() gets the nominal costs and the link: what the device would do if no
host were ever late, which the measurement can only exceed.

    python -m bench.cluster [--pp 4 8 16] [--schedules dualpipe dualpipev zb1p 1f1b] [--costs table tiny]
                            [--device sync async] [--unit-ms 10] [--queue 2] [--link-us US]
                            [--chunks-per-pp 2] [--steps 3] [--warmup 1] [--nice 0]
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from schedules.executor import PipelineExecutor

SCHEDULES = ("dualpipe", "dualpipev", "zb1p", "1f1b")
COST_SETS = ("table", "tiny")
DEVICES = ("sync", "async")
WIDTH = 16            # elements of the activation each stage computes on: small, so the wire time is gloo's latency
# two more elements ride along: when the tensor is ready (its computation's end, or the end of the action before the
# SEND that carried it), and on which rank (rank + 1; 0 = produced on no device: inputs, the loss's gradient)
STAMP, SOURCE = WIDTH, WIDTH + 1


# ---------------------------------------------------------------- the emulated device and stage
@dataclass(frozen=True)
class StageCosts:
    """Integer microseconds of one stage's actions, in simulate.Costs' notation: B is the input-gradient backward,
    FB the overlapped pair without its weight gradient (a pair with a full backward also pays W)."""
    F: int
    B: int
    W: int
    FB: int

    def __post_init__(self):
        for k in ("F", "B", "W", "FB"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"StageCosts.{k}={v!r}: must be an integer number of microseconds >= 0")

    @classmethod
    def table(cls, unit_us: int) -> "StageCosts":
        # F = 1, full B = 2, W = 1, F&B = 2.5: input-gradient B = 2 - 1, pair without W = 2.5 - 1
        return cls(F=unit_us, B=unit_us, W=unit_us, FB=unit_us * 3 // 2)

    def simulate_costs(self, p2p_us: float = 0):
        from schedules import Costs
        return Costs(F=self.F, B=self.B, W=self.W, FB=self.FB, p2p=p2p_us)


class Device:
    """The emulated accelerator of this process, in one of two modes.

    sync   the host sleeps each computation's cost: host work and computation take turns, as when a CPU computes.
    async  a stream, as a GPU runs one: the host launches a computation and goes on; the computation starts when
           the host has launched it, the stream's previous one has ended and its input is there (stamped in the
           tensor: the end of the action before the SEND that carried it, plus `link` if it came from another rank),
           and lasts exactly its cost. The host sleeps only when `depth` launched computations have not ended (a
           launch queue: the host runs at most that far ahead) and at the end of the step (synchronize). Its own work
           overlaps the computations; it costs time only when the stream runs dry waiting for a launch (`late`).

    Times are seconds from the step's epoch, the instant every rank starts it at (`start_together`): float64 keeps
    them exact to far below a microsecond, where time.time() itself (1.8e9 s) resolves 0.24 us and a chain of
    computations would add that up. log: (kind, nominal us, start, end, launched, late, action) per computation, in
    time.time() seconds once taken; `action` counts the executor's computations (StreamOrderedExecutor).
    host_sleeps: (start, end) of the host's sleeps, time.time() seconds."""
    mode, depth, link_s, rank = "sync", 2, 0.0, 0
    log: list = []
    host_sleeps: list = []
    action = -1
    _epoch = 0.0
    _busy = 0.0
    _pending: list = []
    _pair_end: Optional[float] = None      # inside an F&B pair: its halves neither sleep nor launch

    @classmethod
    def configure(cls, mode: str, depth: int = 2, link_us: float = 0.0, rank: int = 0) -> None:
        if mode not in DEVICES:
            raise ValueError(f"device mode {mode!r}: allowed {', '.join(DEVICES)}")
        cls.mode, cls.depth, cls.link_s, cls.rank = mode, depth, link_us / 1e6, rank

    @classmethod
    def begin(cls, epoch: Optional[float] = None) -> None:
        """A new step: times count from `epoch` (time.time(); the same on every rank), the stream is free now."""
        cls._epoch = time.time() if epoch is None else epoch
        cls._busy, cls._pending, cls.action = cls.now(), [], -1

    @classmethod
    def now(cls) -> float:
        return time.time() - cls._epoch

    @classmethod
    def _sleep_until(cls, t: float) -> None:
        """Sleep until `t` seconds after the epoch."""
        now = time.time()
        if cls._epoch + t > now:
            time.sleep(cls._epoch + t - now)
            cls.host_sleeps.append((now, time.time()))

    @classmethod
    def ready(cls, t: Optional[torch.Tensor]) -> float:
        """When tensor t's producer finished, plus the link if another rank produced it (0: no device did)."""
        if t is None:
            return 0.0
        stamp, source = t.detach()[0, STAMP:].tolist()
        if source == 0:
            return 0.0
        return stamp + (cls.link_s if int(source) != cls.rank + 1 else 0.0)

    @classmethod
    def run(cls, kind: str, us: int, ready: float = 0.0) -> float:
        """Compute `kind` for `us` microseconds once `ready`; return when it ends (the stamp of what it produces)."""
        if cls._pair_end is not None and kind in ("F", "B"):
            return cls._pair_end
        if cls.mode == "sync":
            t = cls.now()
            time.sleep(us / 1e6)
            end = cls.now()
            cls.host_sleeps.append((cls._epoch + t, cls._epoch + end))
            cls.log.append((kind, us, t, end, t, 0.0, cls.action))
            return end
        if len(cls._pending) >= cls.depth:
            cls._sleep_until(cls._pending[-cls.depth])
        now = cls.now()
        cls._pending = [e for e in cls._pending if e > now]
        could = max(cls._busy, ready)
        start = max(now, could)
        end = cls._busy = start + us / 1e6
        cls._pending.append(end)
        cls.log.append((kind, us, start, end, now, start - could, cls.action))
        return end

    @classmethod
    def send_stamp(cls) -> float:
        """When a SEND posted now can leave: after everything launched so far, and not before it is posted."""
        return max(cls._busy, cls.now()) if cls.mode == "async" else cls.now()

    @classmethod
    def synchronize(cls) -> None:
        if cls.mode == "async":
            cls._sleep_until(cls._busy)

    @classmethod
    def take(cls) -> tuple[list, list]:
        e = cls._epoch
        ops = [(k, us, e + s, e + t, e + l, late, i) for k, us, s, t, l, late, i in cls.log]
        out = ops, cls.host_sleeps
        cls.log, cls.host_sleeps = [], []
        return out


def _stamped(values: torch.Tensor, end: float) -> torch.Tensor:
    out = torch.empty(values.shape[0], WIDTH + 2, dtype=values.dtype)
    out[:, :WIDTH] = values
    out[:, STAMP], out[:, SOURCE] = end, Device.rank + 1
    return out


class _Sleeping(torch.autograd.Function):
    """y = x * w on the first WIDTH elements, taking the stage's F in forward, B for the input gradient and W for the
    weight gradient (deferred to WeightGradStore when the executor runs a B, at once in a full backward). Outputs
    and input gradients carry the end of the computation that produced them."""

    @staticmethod
    def forward(ctx, x, weight, costs: StageCosts):
        ctx.save_for_backward(x)
        ctx.weight, ctx.costs = weight, costs      # by handle: a deferred gradient lands in the parameter's .grad
        end = Device.run("F", costs.F, Device.ready(x))
        return _stamped(x[:, :WIDTH] * weight, end)

    @staticmethod
    def backward(ctx, grad_out):
        from schedules.weight_grad import WeightGradStore

        (x,) = ctx.saved_tensors
        weight, costs = ctx.weight, ctx.costs
        end = Device.run("B", costs.B, Device.ready(grad_out))
        grad_x = _stamped(grad_out[:, :WIDTH] * weight, end)

        def weight_grad() -> torch.Tensor:
            Device.run("W", costs.W)
            return (grad_out[:, :WIDTH] * x[:, :WIDTH]).sum(0)

        if WeightGradStore.enabled:
            def deferred():
                g = weight_grad()
                weight.grad = g if weight.grad is None else weight.grad + g
            deferred.params = (weight,)
            WeightGradStore.put(deferred)
            return grad_x, None, None
        return grad_x, weight_grad(), None


class SleepStage(nn.Module):
    """One pipeline stage of the emulated cluster: a [WIDTH] weight, and the stage's costs on the Device."""

    def __init__(self, costs: StageCosts, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(WIDTH, generator=g, dtype=torch.float64))
        self.costs = costs

    def forward(self, x):
        return _Sleeping.apply(x, self.weight, self.costs)

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        """deepseek-ai/DualPipe's F&B hook: the pair computes its F&B - W once, both halves inside it (their own F
        and B off). W is untouched: deferred (a B pair) or computed after the pair (a full pair). On the async
        device the pair is launched first, once both its inputs are there, and the halves' outputs carry its end;
        on the sync one it is slept after them."""
        cost = module0.costs.FB
        if Device.mode == "async":
            grad1 = output_grads1[0] if output_grads1 else None
            Device._pair_end = Device.run("FB", cost, max(Device.ready(inputs0[0]), Device.ready(grad1)))
        else:
            Device._pair_end = 0.0
        try:
            outputs0 = module0(*inputs0)
            loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
            if loss1 is not None:
                loss1.backward()
            elif outputs1:
                torch.autograd.backward(outputs1, output_grads1)
        finally:
            Device._pair_end = None
        if Device.mode == "sync":
            Device.run("FB", cost)
        return outputs0, loss0


def criterion(out, label):
    return (out[:, :WIDTH] * label).sum()


def micro_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input [1, WIDTH + 2] with empty stamps, label [1, WIDTH]) per micro-batch, float64."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x, y = torch.randn(1, WIDTH, generator=g, dtype=torch.float64), torch.randn(1, WIDTH, generator=g,
                                                                                   dtype=torch.float64)
        out.append((torch.cat([x, torch.zeros(1, 2, dtype=torch.float64)], 1), y))
    return out


def stage_seed(layout, stage: int) -> int:
    # both copies of a DualPipe part start equal, like the model they are cut from
    return 1000 + layout.stage_to_part[stage]


# ---------------------------------------------------------------- one process per rank
class StreamOrderedExecutor(PipelineExecutor):
    """The executor, with a SEND on the async device leaving after everything launched before it, as a send enqueued
    on a GPU's stream does: its tensors are stamped with the stream's end when the executor posts them (before the
    next computation), and every computation the device runs tagged with the action that launched it. Nothing else
    changes."""

    def _flush(self) -> None:
        if Device.mode == "async":
            for op, tensor, *_ in self._ops:
                if op is dist.isend:
                    tensor[0, STAMP], tensor[0, SOURCE] = Device.send_stamp(), Device.rank + 1
        super()._flush()


def _tagging(do):
    def tagged(self, a):
        Device.action += 1
        return do(self, a)
    return tagged


for _op in ("F", "B", "W", "BW", "FB"):
    setattr(StreamOrderedExecutor, f"_do_{_op}", _tagging(getattr(PipelineExecutor, f"_do_{_op}")))


class Job:
    """One (device mode, cost set, schedule) on this rank: stages, executor, inputs."""

    def __init__(self, device: str, cost_name: str, costs: StageCosts, schedule: str, pp: int, n: int):
        from schedules import build, get_layout
        from schedules.verify import microbatches_of

        self.device, self.cost_name, self.costs, self.schedule, self.n = device, cost_name, costs, schedule, n
        rank = dist.get_rank()
        self.layout = get_layout(schedule, pp)
        self.actions = build(schedule, pp, n)[rank]
        self.stages = {s: SleepStage(costs, stage_seed(self.layout, s)) for s in self.layout.stages_of(rank)}
        self.executor = StreamOrderedExecutor(self.layout, self.stages, criterion=criterion,
                                              p2p_shapes=[[1, WIDTH + 2]], p2p_dtype=torch.float64)
        data = micro_batches(n)
        held = lambda pick: {mb for s in self.stages if pick(s) for mb in microbatches_of(self.layout, s, n)}
        self.inputs = {mb: (data[mb][0],) for mb in held(self.layout.is_first)}
        self.labels = {mb: (data[mb][1],) for mb in held(self.layout.is_last)}

    @property
    def key(self) -> tuple[str, str, str]:
        return self.device, self.cost_name, self.schedule

    def step(self, depth: int, link_us: float, epoch: Optional[float] = None) -> dict:
        for m in self.stages.values():
            m.weight.grad = None
        Device.configure(self.device, depth, link_us, dist.get_rank())
        Device.take()
        cpu, begin = time.process_time(), time.time()
        Device.begin(epoch)
        res = self.executor.run(self.actions, self.n, self.inputs, self.labels, trace=True)
        Device.synchronize()
        cpu = time.process_time() - cpu
        ops, host_sleeps = Device.take()
        t0 = res.start_time
        host = [(t0 + s, t0 + e, a) for s, e, a in res.compute_spans]
        # the bubble's busy time: the sync host's traced actions; the async device's computations (not the span
        # from an action's first to its last, which would count a gap the host left inside it as busy)
        busy = sum(e - s for s, e, _ in host) if self.device == "sync" else sum(op[3] - op[2] for op in ops)
        return dict(begin=begin, host_spans=host, spans=host if self.device == "sync" else device_spans(host, ops),
                    busy_s=busy, cpu_s=cpu,
                    waits=[(t0 + s, t0 + e, w) for s, e, w in res.trace if isinstance(w, str)],
                    ops=ops, host_sleeps=host_sleeps,
                    grads={s: m.weight.grad.clone() for s, m in self.stages.items()},
                    losses={mb: float(v) for mb, v in res.losses.items()})


def launched_by(host_spans: list, ops: list) -> list[list]:
    """Per traced action, the device computations it launched (by the action tag each computation carries)."""
    out: list[list] = [[] for _ in host_spans]
    for op in ops:
        out[op[6]].append(op)
    return out


def device_spans(host_spans: list, ops: list) -> list[tuple]:
    """(start, end, action) of each traced action's computations on the async device: first start to last end."""
    return [(min(o[2] for o in mine), max(o[3] for o in mine), a)
            for (_, _, a), mine in zip(host_spans, launched_by(host_spans, ops)) if mine]


def start_together(margin_s: float = 0.05) -> float:
    """Start the step on every rank at one instant, as simulate() does: rank 0 names a time `margin_s` ahead and every
    rank sleeps until then, rather than each leaving a barrier whenever its wake-up is delivered. The step's times
    count from that instant (Device's epoch). Ranks still wake apart by the machine's scheduling (16 processes on 2
    cores: a few milliseconds); each step records how late its rank began (start_skew_s)."""
    t = torch.tensor([time.time() + margin_s], dtype=torch.float64)
    dist.broadcast(t, 0)
    start = float(t)
    Device.begin(start)
    Device._sleep_until(0.0)
    Device.take()
    return start


def p2p_latency_us(rounds: int = 60) -> float:
    """One-way time of one activation between ranks 0 and 1 (half a ping-pong, median), the others waiting."""
    from parallel.exchanges import ping_pong_s

    return ping_pong_s(torch.zeros(1, WIDTH + 2, dtype=torch.float64), rounds) * 1e6


def _worker(rank: int, pp: int, port: int, plan: dict, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(pp))
    torch.set_num_threads(1)
    if plan.get("nice"):
        # before any thread starts (gloo's included): a thread inherits its creator's niceness
        os.setpriority(os.PRIO_PROCESS, 0, plan["nice"])
    from bench.validity import set_timer_slack_ns

    set_timer_slack_ns(1000)  # the stages' costs are sleeps: wake within 1 us of the deadline, not Linux's 50 us
    dist.init_process_group("gloo", rank=rank, world_size=pp, timeout=timedelta(seconds=plan["timeout"]))
    p2p_us = p2p_latency_us()
    # the async device's link: what a message costs on the wire, given or the latency just measured
    link_us = float(plan["link_us"]) if plan.get("link_us") is not None else round(p2p_us)
    n = plan["chunks_per_pp"] * pp
    jobs = [Job(d, c, plan["costs"][c], s, pp, n) for d in plan["devices"] for c in plan["cost_sets"]
            for s in plan["schedules"]]
    records: dict = {j.key: [] for j in jobs}
    for i in range(plan["warmup"] + plan["steps"]):
        for j in jobs:        # one step of every job per round: the machine's load drift falls on all alike
            start = start_together()
            rec = j.step(plan["depth"], link_us, start)
            rec["start_skew_s"] = rec["begin"] - start
            if i >= plan["warmup"]:
                records[j.key].append(rec)
    gathered = [None] * pp if rank == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if rank == 0:
        with open(out_path, "wb") as f:
            pickle.dump(dict(records=gathered, p2p_us=p2p_us, link_us=link_us, depth=plan["depth"]), f)
    dist.barrier()
    dist.destroy_process_group()


def run_cluster(pp: int, schedules, cost_sets: dict, steps: int, warmup: int = 1, chunks_per_pp: int = 2,
                timeout: int = 300, nice: int = 0, devices=("sync",), depth: int = 2,
                link_us: Optional[float] = None) -> dict:
    """Spawn `pp` ranks, run every schedule with every cost set on every device mode; return {records: [rank] ->
    {(device, costs, schedule): [step records]}, p2p_us, link_us, depth}. link_us: the async device's link
    (None: the gloo latency measured at start-up)."""
    import torch.multiprocessing as mp

    from parallel.mesh import free_port

    plan = dict(schedules=list(schedules), cost_sets=list(cost_sets), costs=dict(cost_sets), steps=steps,
                warmup=warmup, chunks_per_pp=chunks_per_pp, timeout=timeout, nice=nice, devices=list(devices),
                depth=depth, link_us=link_us)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.pkl")
        mp.spawn(_worker, args=(pp, free_port(), plan, path), nprocs=pp, join=True)
        with open(path, "rb") as f:
            return pickle.load(f)


# ---------------------------------------------------------------- measured costs of deepseek_v3_tiny
def profile_tiny(repeats: int = 12) -> tuple[StageCosts, dict]:
    """F, input-gradient B, W and a forward + full backward of a real deepseek_v3_tiny stage, in one process: median
    us of the thread's CPU time, which is what the computation costs whatever else the machine runs (1 thread).

    The stage is the one PP=4 gives rank 1 (one MoE layer), with the trainer's weight-gradient split. One process has
    no expert all-to-all to hide, so the F&B pair is the forward followed by the full backward of another chunk."""
    from bench.common import compose
    from framework.models import build_model
    from schedules.stage import split_model
    from schedules.weight_grad import WeightGradStore, enable_weight_grad_split

    cfg = compose("model=deepseek_v3_tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    part = split_model(model, cfg.model.num_hidden_layers)[1]
    converted = enable_weight_grad_split(part)
    part.train()
    micro = cfg.train.global_batch_size // cfg.train.micro_batches
    shape = (micro, cfg.train.seq_len, cfg.model.hidden_size)
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)

    def clock(fn) -> float:
        t = time.thread_time()
        fn()
        return (time.thread_time() - t) * 1e6

    times: dict[str, list[float]] = {k: [] for k in ("F", "B", "W", "BW", "F&B")}
    for i in range(repeats + 2):
        xs = x.clone().requires_grad_(True)
        box = {}
        tf = clock(lambda: box.update(y=part(xs)))
        WeightGradStore.enabled = True
        tb = clock(lambda: torch.autograd.backward(box["y"], dy))
        WeightGradStore.enabled = False
        funcs = WeightGradStore.take_cache()
        tw = clock(lambda: [f() for f in funcs])
        box["y"] = part(x.clone().requires_grad_(True))
        tbw = clock(lambda: torch.autograd.backward(box["y"], dy))
        other = part(x.clone().requires_grad_(True))
        tfb = clock(lambda: (part(x.clone().requires_grad_(True)), torch.autograd.backward(other, dy)))
        part.zero_grad(set_to_none=True)
        if i >= 2:
            for k, v in zip(times, (tf, tb, tw, tbw, tfb)):
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    costs = StageCosts(F=round(med["F"]), B=round(med["B"]), W=round(med["W"]), FB=max(0, round(med["F&B"] - med["W"])))
    info = dict(medians_us=med, shape=shape, split_linears=converted,
                params=sum(p.numel() for p in part.parameters()), threads=torch.get_num_threads())
    return costs, info


# ---------------------------------------------------------------- analysis
def window(step: list[dict]) -> tuple[float, float]:
    """First computation's start and last computation's end over all ranks (simulate's 0 and makespan)."""
    spans = [sp for r in step for sp in r["spans"]]
    return min(s for s, _, _ in spans), max(e for _, e, _ in spans)


def step_bubbles(step: list[dict]) -> tuple[float, list[float]]:
    """(makespan, per-rank bubble) in seconds: makespan minus the rank's computation time."""
    lo, hi = window(step)
    busy = [r["busy_s"] if "busy_s" in r else sum(e - s for s, e, _ in r["spans"]) for r in step]
    return hi - lo, [(hi - lo) - b for b in busy]


def _clip(spans, lo: float, hi: float) -> float:
    return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e, *_ in spans)


def overhead_per_action(rank_rec: dict) -> dict[str, float]:
    """Executor overhead of one rank in one step, us per computation: inside actions (the traced action minus the
    host's sleeps in it: autograd, the executor's bookkeeping) and between actions (neither computing nor waiting for
    data: posting p2p...); with the async device, `late`: how long its stream ran dry waiting for the host."""
    spans = rank_rec["host_spans"]
    lo, hi = spans[0][0], spans[-1][1]
    busy = sum(e - s for s, e, _ in spans)
    slept = _clip(rank_rec["host_sleeps"], lo, hi)
    waits = _clip(rank_rec["waits"], lo, hi)
    n = len(spans)
    inside, between = (busy - slept) / n, ((hi - lo) - busy - waits) / n
    return dict(inside=inside * 1e6, between=between * 1e6, total=(inside + between) * 1e6,
                cpu=rank_rec.get("cpu_s", float("nan")) / n * 1e6,
                late_ms=sum(op[5] for op in rank_rec.get("ops", ())) * 1e3,
                skew_ms=rank_rec.get("start_skew_s", 0.0) * 1e3)


def nominal_of_spans(rank_rec: dict) -> list[int]:
    """Per traced computation: the nominal us of what it computed on the device (what simulate() would charge)."""
    return [sum(op[1] for op in mine) for mine in launched_by(rank_rec["host_spans"], rank_rec["ops"])]


def measured_costs(steps: list[list[dict]], nominal: StageCosts, p2p_us: float):
    """simulate.Costs (integer us) from the mean traced duration of each kind of action, over ranks and steps: a
    step's makespan adds durations up along its critical path, so the mean is what predicts it."""
    from schedules import Costs

    by_op: dict[str, list[float]] = {}
    for step in steps:
        for r in step:
            for s, e, a in r["spans"]:
                by_op.setdefault(a.op if a.op != "FB" else ("FBfull" if a.full else "FB"), []).append(e - s)
    med = {k: round(statistics.fmean(v) * 1e6) for k, v in by_op.items()}
    W = med.get("W", nominal.W)
    B = med.get("B", med["BW"] - W if "BW" in med else nominal.B)
    FB = med["FBfull"] - W if "FBfull" in med else med.get("FB", nominal.FB)
    return Costs(F=med["F"], B=B, W=W, FB=max(FB, 0), BW=med.get("BW"), p2p=round(p2p_us)), med


def run_p2p_us(steps: list[list[dict]], actions: list[list]) -> tuple[Optional[float], int]:
    """The p2p latency as simulate() means it, measured in the run: from the end of the computation a SEND follows
    (simulate posts it then) to the end of the receiver's wait for that message, over the receives whose rank was
    already waiting when the message was posted. Mean us and the number of such receives (None if none).

    It holds what a message costs on the critical path: the sender's executor work before posting, gloo, and
    waking the receiver."""
    from schedules.actions import COMM_OPS

    posted_after: dict = {}      # (kind, sending stage, mb) -> (rank, index of the computation before the SEND)
    for r, acts in enumerate(actions):
        k = -1
        for a in acts:
            if a.op in ("SEND_F", "SEND_B"):
                posted_after[(a.op[-1], a.stage, a.mb)] = (r, k)
            elif a.op not in COMM_OPS:
                k += 1
    samples = []
    for step in steps:
        for rec in step:
            for s, e, what in rec["waits"]:
                label = what.split(" ", 1)[1] if what.startswith("wait RECV_") else None
                if label is None:
                    continue
                kind, rest = label[5], label[6:].split("@")[0]
                stage, mb = (int(x) for x in rest.split("."))
                src, k = posted_after[(kind, stage, mb)]
                posted = step[src]["spans"][k][1]
                if s <= posted:
                    samples.append(e - posted)
    return (statistics.fmean(samples) * 1e6 if samples else None), len(samples)


def _plus(costs, us: int, full_pairs: bool):
    """Every action `us` longer. A full F&B pair costs FB + W in simulate(): its W carries the extra time.

    The measured p2p latency runs from the end of the computation, so it already holds the sender's work before
    posting: a message sent after the longer action arrives `us` sooner than that latency says, as it did."""
    from schedules import Costs
    return Costs(F=costs.F + us, B=costs.B + us, W=costs.W + us, FB=costs.exact("FB") + (0 if full_pairs else us),
                 BW=costs.exact("BW") + us, p2p=max(0, costs.p2p - us))


def analyse(name: str, pp: int, n: int, steps: list[list[dict]], nominal: StageCosts, p2p_us: float,
            device: str = "sync", link_us: float = 0.0) -> dict:
    """Per rank: measured bubble (median over steps), simulate() with the costs and p2p the computations ran with,
    and the nominal simulation / table formula; executor overhead; sleep overshoot.

    sync: simulate() gets the mean measured duration of each kind of action and the p2p latency measured in the run.
    async: the device computes each action in exactly its cost and a message takes the link, so simulate() gets the
    nominal costs and the link, and never predicts more than was measured: whatever the measured bubble has more
    is the hosts' doing (launching late, a message reaching its host late)."""
    from schedules import bubble_table, build, get_layout, simulate

    acts, layout = build(name, pp, n), get_layout(name, pp)
    if device == "sync":
        in_run, samples = run_p2p_us(steps, acts)
        costs, med = measured_costs(steps, nominal, in_run if in_run is not None else p2p_us)
    else:
        samples = 0
        costs, med = nominal.simulate_costs(link_us), measured_costs(steps, nominal, link_us)[1]
    sim = simulate(acts, layout, costs)
    ideal = simulate(acts, layout, nominal.simulate_costs())
    per_step = [step_bubbles(st) for st in steps]
    measured = [statistics.median(b[r] for _, b in per_step) * 1e6 for r in range(pp)]
    makespan = statistics.median(m for m, _ in per_step) * 1e6
    over = [[overhead_per_action(st[r]) for st in steps] for r in range(pp)]
    overhead = {k: [statistics.median(o[k] for o in over[r]) for r in range(pp)]
                for k in ("inside", "between", "total", "cpu", "late_ms", "skew_ms")}
    between = statistics.fmean(overhead["between"])
    if device == "sync":
        # the executor's work between actions, charged to every action: its sends and its next action start that
        # much later (the last action's share is not in the measured makespan, which ends with a computation)
        full_pairs = all(a.full for rank_acts in acts for a in rank_acts if a.op == "FB")
        charged = simulate(acts, layout, _plus(costs, round(between), full_pairs))
        n_acts = [len(tl) for tl in charged.timelines]
        with_overhead = [charged.makespan - between - (charged.busy[r] - n_acts[r] * round(between))
                         for r in range(pp)]
        shoot = [(op[3] - op[2]) * 1e6 - op[1] for st in steps for r in st for op in r["ops"]]
        overshoot = (statistics.median(shoot), sorted(shoot)[int(0.9 * (len(shoot) - 1))])
    else:
        with_overhead, overshoot = None, None   # the host's work overlaps the computations: nothing to charge
    # cores the emulated cluster itself kept busy: all ranks' CPU time over the makespan (2 cores are all there is)
    cores = statistics.median(sum(r["cpu_s"] for r in st) / m for st, (m, _) in zip(steps, per_step))
    median_step = sorted(range(len(per_step)), key=lambda i: per_step[i][0])[len(per_step) // 2]
    ratio = lambda got: [m / s if s else float("nan") for m, s in zip(measured, got)]
    return dict(
        schedule=name, pp=pp, n=n, device=device, costs=costs, op_us=med, measured=measured, makespan=makespan,
        sim=list(sim.bubble), sim_makespan=sim.makespan, ideal=list(ideal.bubble), ideal_makespan=ideal.makespan,
        table=bubble_table(name, pp, nominal.simulate_costs()), ratio=ratio(sim.bubble),
        with_overhead=with_overhead, between_us=between, p2p_us=costs.p2p, p2p_samples=samples,
        ratio_overhead=ratio(with_overhead) if with_overhead else None,
        bubble_ratio=[m / makespan for m in measured], sim_bubble_ratio=list(sim.bubble_ratio),
        overhead=overhead, cores=cores, overshoot_us=overshoot, median_step=median_step)


def rows_for(data: dict, pp: int, cost_sets: dict, schedules, chunks_per_pp: int, devices=("sync",)) -> list[dict]:
    recs, out = data["records"], []
    for d in devices:
        for c, nominal in cost_sets.items():
            for name in schedules:
                steps = [list(x) for x in zip(*(recs[r][(d, c, name)] for r in range(pp)))]
                row = analyse(name, pp, chunks_per_pp * pp, steps, nominal, data["p2p_us"], d, data["link_us"])
                row.update(cost_set=c, steps=steps)
                out.append(row)
    return out


# ---------------------------------------------------------------- report
def _worst(row: dict) -> int:
    return max(range(row["pp"]), key=lambda r: row["sim"][r])


def _dev(ratios) -> float:
    return max(abs(x - 1) for x in ratios)


def _or_dash(row: dict, key: str, fmt) -> str:
    return fmt(row[key]) if row[key] is not None else "-"


def summary_lines(rows: list[dict]) -> list[str]:
    lines = ["| device | costs | schedule | PP | N | p2p us in simulate() | step ms | bubble ms, worst rank: measured | "
             "simulated | measured / simulated | all ranks: max \\|measured / simulated - 1\\| | simulated + executor "
             "overhead | measured / that, worst rank | all ranks: max \\|. - 1\\| | bubble / step: measured | simulated "
             "| nominal costs, no latency: bubble ms | table formula ms | executor us / action: wall (inside + "
             "between) | CPU | device idle waiting for its host, ms (rank max) | cores busy with the ranks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        w = _worst(row)
        ov = statistics.median(row["overhead"]["total"])
        ins, btw = statistics.median(row["overhead"]["inside"]), statistics.median(row["overhead"]["between"])
        p2p = f"{float(row['p2p_us']):g} " + (f"({row['p2p_samples']})" if row["device"] == "sync" else "(link)")
        lines.append(f"| {row['device']} | {row['cost_set']} | {row['schedule']} | {row['pp']} | {row['n']} | {p2p} | "
                     f"{row['makespan'] / 1e3:.1f} | {row['measured'][w] / 1e3:.2f} | {row['sim'][w] / 1e3:.2f} | "
                     f"{row['ratio'][w]:.3f} | {_dev(row['ratio']):.3f} | "
                     f"{_or_dash(row, 'with_overhead', lambda v: f'{v[w] / 1e3:.2f}')} | "
                     f"{_or_dash(row, 'ratio_overhead', lambda v: f'{v[w]:.3f}')} | "
                     f"{_or_dash(row, 'ratio_overhead', lambda v: f'{_dev(v):.3f}')} | {row['bubble_ratio'][w]:.3f} | "
                     f"{row['sim_bubble_ratio'][w]:.3f} | {row['ideal'][w] / 1e3:.2f} | {row['table'] / 1e3:.2f} | "
                     f"{ov:.0f} ({ins:.0f} + {btw:.0f}) | {statistics.median(row['overhead']['cpu']):.0f} | "
                     + (f"{max(row['overhead']['late_ms']):.2f} | " if row["device"] == "async" else "- | ")
                     + f"{row['cores']:.2f} |")
    return lines


def per_rank_lines(row: dict) -> list[str]:
    lines = [f"\n{row['device']} / {row['cost_set']} / {row['schedule']} / PP={row['pp']}:\n",
             "| rank | measured bubble ms | simulated ms | measured / simulated | simulated + executor overhead ms | "
             "measured / that | executor us / action | device idle waiting for its host ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in range(row["pp"]):
        lines.append(f"| {r} | {row['measured'][r] / 1e3:.2f} | {row['sim'][r] / 1e3:.2f} | {row['ratio'][r]:.3f} | "
                     f"{_or_dash(row, 'with_overhead', lambda v: f'{v[r] / 1e3:.2f}')} | "
                     f"{_or_dash(row, 'ratio_overhead', lambda v: f'{v[r]:.3f}')} | "
                     f"{row['overhead']['total'][r]:.0f} | "
                     + (f"{row['overhead']['late_ms'][r]:.2f} |" if row["device"] == "async" else "- |"))
    return lines


def goal_lines(rows: list[dict]) -> list[str]:
    out = []
    by = {(r["device"], r["cost_set"], r["schedule"], r["pp"]): r for r in rows}
    for d, c in dict.fromkeys((r["device"], r["cost_set"]) for r in rows):
        for pp in sorted({r["pp"] for r in rows if r["pp"] >= 8}):
            got = [(s, by[(d, c, s, pp)]) for s in SCHEDULES if (d, c, s, pp) in by]
            checks = [("ratio", "simulated")]
            if d == "sync":
                checks.append(("ratio_overhead", "simulated + executor overhead"))
            for key, what in checks:
                ok = all(_dev(row[key]) <= 0.10 for _, row in got)
                devs = ", ".join(f"{s} {_dev(row[key]):.1%} (worst rank {abs(row[key][_worst(row)] - 1):.1%})"
                                 for s, row in got)
                out.append(f"- {d} device, {c}, PP={pp}: measured bubble within 10% of {what} on every rank: "
                           f"{'MET' if ok else 'NOT MET'} (largest deviation over ranks: {devs}).")
            if (d, c, "dualpipe", pp) in by:
                dp = by[(d, c, "dualpipe", pp)]
                dpr = dp["bubble_ratio"][_worst(dp)]
                others = {s: by[(d, c, s, pp)]["bubble_ratio"][_worst(by[(d, c, s, pp)])] for s in ("zb1p", "1f1b")
                          if (d, c, s, pp) in by}
                ok = all(dpr < v for v in others.values())
                out.append(f"- {d} device, {c}, PP={pp}: DualPipe's measured bubble / step below ZB1P's and 1F1B's "
                           f"(worst ranks): {'MET' if ok else 'NOT MET'}: {dpr:.3f} vs " +
                           ", ".join(f"{s} {v:.3f}" for s, v in others.items()) + ".")
    return out


def save_gantt(row: dict, path) -> None:
    from schedules.timeline import draw_gantt

    step = row["steps"][row["median_step"]]
    lo, _ = window(step)
    ms_ = lambda spans: [((s - lo) * 1e3, (e - lo) * 1e3, a) for s, e, a in spans]
    # the host's waits for data are the device's idle time only when the host computes (sync)
    comm = [ms_(r["waits"]) if row["device"] == "sync" else [] for r in step]
    if row["device"] == "sync":
        boxes = [ms_(r["spans"]) for r in step]
    else:   # each computation on its own, so a gap inside an action shows
        boxes = [ms_([(op[2], op[3], r["host_spans"][op[6]][2]) for op in r["ops"]]) for r in step]
    draw_gantt(boxes, str(path), comm=comm,
               title=f"emulated cluster ({row['device']} device), measured {row['schedule']} PP={row['pp']}, "
                     f"{row['n']} chunks, {row['cost_set']} costs (ms)")


def report(a, rows: list[dict], p2p: dict, tiny_info: Optional[dict], cost_sets: dict, load: tuple,
           argv: list[str], elapsed: float, checks: Optional[list] = None) -> str:
    from bench import validity
    from bench.common import OUT, machine, write_report

    pps = ", ".join(str(r) for r in dict.fromkeys(row["pp"] for row in rows))
    lines = [f"## Emulated cluster: pipeline schedules at PP {pps} on 2 cores"
             + (f", {a.unit_ms:g} ms units" if "table" in cost_sets else "") + " (bench/cluster.py)\n",
             "One process per pipeline rank (gloo, 1 thread each), the real executor (schedules/executor.py) and real "
             "gloo p2p; each stage is a custom autograd function whose F, B and W (W deferred through "
             "WeightGradStore exactly as the trainer's split layers do) take their cost on an emulated device, and an "
             "F&B hook that takes the pair's cost once. Two devices (`Device` in bench/cluster.py): sync, where the "
             "host sleeps each cost, so its own work and the computations take turns as on a CPU; async, a stream "
             "as a GPU runs one: the host launches a computation and goes on (at most "
             f"{a.queue} launched and not ended), a computation starts once launched, once the stream's previous "
             "one ended and once its input is there (the producer's end, carried in the tensor, plus the link if "
             "another rank produced it), and lasts exactly its cost; the host sleeps for the stream at the end of the "
             "step. Bubble, as in schedules/simulate.py: per rank, the makespan (first computation's start to the "
             "last one's end over all ranks) minus the rank's computation time; bubble / step = that over the "
             "makespan. Simulated, sync: simulate() fed the mean measured duration of each kind of action (sleep "
             "overshoot and the autograd work inside an action included) and the mean p2p latency measured in the "
             "run (simulate() posts a SEND when the computation before it ends: from that end to the end of the "
             "receiver's wait, over the receives whose rank was already waiting; in brackets how many). Simulated, "
             "async: simulate() with the nominal costs and the link as its p2p latency. That is what the device "
             "computes when no host is ever late, so measured >= simulated holds by construction and the ratio does "
             "not test simulate(): it tests that the real executor runs simulate()'s actions in its order with its "
             "dependencies (a message used early would start a computation before simulate() does, which "
             "tests/bench/test_cluster_smoke.py checks per action), and measures what the hosts cost, the time a "
             "stream ran dry because its host had not launched yet or a message had not yet reached its host. "
             "Device idle waiting for its host: the first of these, on the rank's own stream; a rank delayed by a "
             "late message from another rank is not in it, so it does not add up to the excess. "
             "Nominal = simulate() with the nominal costs and no latency; table = the DualPipe README / V3 Table 2 "
             "formula (DualPipeV: PP = 2 x devices). Simulated + executor overhead (sync): the same simulate() with "
             "every action made longer by the executor's measured work between actions (mean over ranks), so that the "
             "next action starts that late (a message still arrives the measured p2p latency after the computation "
             "before its SEND); its bubble is counted like the measured one (makespan minus the computations). "
             "Executor us / action, wall: per action, the host's time inside it that is not a sleep (autograd, "
             "bookkeeping) plus the time between actions that is not a wait for data (posting p2p...), median over "
             "ranks; on a busy machine much of it is waiting for a core. CPU: the "
             "rank process's CPU time during the step (all its threads, gloo's included) per computation; cores busy "
             "with the ranks: all ranks' CPU time over the step, against the machine's cores (what is left for the "
             "other jobs, and the ranks' own contention). Measured "
             "bubbles and step times: median over "
             f"{a.steps} steps after {a.warmup} warm-up, the schedules' steps interleaved.\n"]
    desc = {"table": f"table: F = 1, B = 2, W = 1, F&B = 2.5 units of {a.unit_ms:g} ms "
                     f"(simulate notation, us: {cost_sets['table']})" if "table" in cost_sets else "",
            "tiny": ""}
    if tiny_info is not None:
        m = tiny_info["medians_us"]
        desc["tiny"] = (f"tiny: measured on one deepseek_v3_tiny stage (layer 1, MoE, {tiny_info['params']} "
                        f"parameters, micro-batch {list(tiny_info['shape'])}, {tiny_info['split_linears']} split "
                        f"linears, {tiny_info['threads']} thread), median us of CPU time: F {m['F']:.0f}, B (input grad) "
                        f"{m['B']:.0f}, W {m['W']:.0f}, full backward {m['BW']:.0f}, forward + full backward of "
                        f"another chunk {m['F&B']:.0f} -> {cost_sets['tiny']}. Only the layers with a weight-gradient "
                        "split defer to W; whatever does not defer stays in B.")
    lines += [f"- {desc[c]}" for c in cost_sets if desc.get(c)]
    lines.append(f"- the bare gloo latency before the run (half a ping-pong of the [1, {WIDTH + 2}] float64 activation "
                 "between ranks 0 and 1, the others idle, median): " +
                 ", ".join(f"PP={pp}: {v:.0f} us" for pp, v in p2p.items())
                 + (f"; the async device's link: {a.link_us:g} us" if a.link_us is not None else
                    "; the async device's link: that latency, rounded"))
    shoots = {(r["cost_set"], r["pp"]): r["overshoot_us"] for r in rows if r["overshoot_us"] is not None}
    if shoots:
        lines.append("- sync device, sleep overshoot (actual - nominal, median / 90th percentile, us): " +
                     ", ".join(f"{c} PP={pp}: {m:.0f} / {p:.0f}" for (c, pp), (m, p) in shoots.items()))
    skew: dict = {}
    for r in rows:
        skew.setdefault((r["device"], r["pp"]), []).append(max(r["overhead"]["skew_ms"]))
    lines.append("- every step starts at one instant named by rank 0 (`start_together`); a rank began its step this "
                 "long after it (median over steps, largest over ranks and schedules), ms: " +
                 ", ".join(f"{d} PP={pp}: {max(v):.2f}" for (d, pp), v in skew.items()))
    lines.append(f"- 1-minute load average ({os.cpu_count()} cores): {load[0]:.1f} at the start, {load[1]:.1f} at "
                 "the end; the cores are shared with other jobs, which lengthens the executor's own work.\n")
    lines += summary_lines(rows)
    lines += ["\nGoal checks (reported, not asserted):\n"] + goal_lines(rows)
    for d in a.device:
        gantt = [r for r in rows if r["schedule"] == "dualpipe" and r["pp"] == 8 and r["device"] == d]
        if gantt:
            OUT.mkdir(exist_ok=True)
            png = OUT / f"{a.name}_{d}_dualpipe_pp8.png"
            save_gantt(gantt[0], png)
            lines.append(f"\nMeasured DualPipe at PP=8 on the {d} device ({gantt[0]['cost_set']} costs, the step "
                         f"of median length): bench/out/{png.name}.")
    lines.append("\n<details><summary>Per rank</summary>\n")
    for row in rows:
        lines += per_rank_lines(row)
    lines.append("\n</details>\n")
    lines.append(f"Command: `{' '.join(['python -m bench.cluster', *argv])}` ({elapsed:.0f} s); machine: {machine()} "
                 "per process.\n")
    if checks:
        lines.append(validity.checks_table(checks))
        ok, why = validity.verdict(checks)
        if not ok:
            lines.append(f"\n**The run is not valid**: {why}. The figures above are kept for reference only.")
    text = "\n".join(lines)
    write_report(a.name, text)
    return text


# ---------------------------------------------------------------- command line
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16], help="pipeline sizes (even, 2..32)")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), help=f"any of {', '.join(SCHEDULES)}")
    p.add_argument("--costs", nargs="+", default=list(COST_SETS), help=f"any of {', '.join(COST_SETS)}")
    p.add_argument("--unit-ms", type=float, default=10.0, help="the table costs' unit")
    p.add_argument("--device", nargs="+", default=list(DEVICES),
                   help="sync: the host sleeps each cost (host work and computations take turns); async: a stream "
                        "the host launches computations on and runs ahead of, as on a GPU")
    p.add_argument("--queue", type=int, default=2,
                   help="async device: computations launched and not ended before the host waits (>= 1; 1 leaves the "
                        "stream idle while the host wakes and launches the next)")
    p.add_argument("--link-us", type=float, default=None,
                   help="async device: a message's time on the wire (default: the gloo latency measured at start-up)")
    p.add_argument("--chunks-per-pp", type=int, default=2, help="micro-batches per step = this x PP (>= 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per schedule")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=int, default=300, help="seconds before a stuck communication fails the run")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the rank processes (-20..19; below 0 needs the right to raise priority): the "
                        "ranks mostly sleep, a negative value lets them wake on time on a machine busy with other jobs")
    p.add_argument("--name", default="cluster", help="report name: bench/out/NAME.md")
    a = p.parse_args(argv)
    for pp in a.pp:
        if pp < 2 or pp > 32 or pp % 2:
            raise ValueError(f"--pp={pp}: must be even, in 2..32 (DualPipe pairs mirror ranks)")
    for s in a.schedules:
        if s not in SCHEDULES:
            raise ValueError(f"--schedules {s}: allowed {', '.join(SCHEDULES)}")
    for c in a.costs:
        if c not in COST_SETS:
            raise ValueError(f"--costs {c}: allowed {', '.join(COST_SETS)}")
    for d in a.device:
        if d not in DEVICES:
            raise ValueError(f"--device {d}: allowed {', '.join(DEVICES)}")
    if a.queue < 1:
        raise ValueError(f"--queue={a.queue}: must be >= 1")
    if a.link_us is not None and not (math.isfinite(a.link_us) and a.link_us >= 0):
        raise ValueError(f"--link-us={a.link_us}: must be a finite number of microseconds >= 0")
    a.pp, a.schedules, a.costs, a.device = (list(dict.fromkeys(v)) for v in (a.pp, a.schedules, a.costs, a.device))
    if not a.unit_ms > 0:
        raise ValueError(f"--unit-ms={a.unit_ms}: must be > 0")
    if a.chunks_per_pp < 2:
        raise ValueError(f"--chunks-per-pp={a.chunks_per_pp}: must be >= 2 (DualPipe needs 2 x PP micro-batches)")
    if a.steps < 1 or a.warmup < 0:
        raise ValueError(f"--steps={a.steps} / --warmup={a.warmup}: need steps >= 1 and warmup >= 0")
    if not -20 <= a.nice <= 19:
        raise ValueError(f"--nice={a.nice}: must be in -20..19")
    if not a.name.isidentifier():
        raise ValueError(f"--name={a.name!r}: must be a plain identifier (letters, digits, _)")
    return a


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        a = parse(argv)
    except ValueError as e:
        print(f"bench.cluster: {e}", file=sys.stderr)
        sys.exit(2)
    if a.nice < os.getpriority(os.PRIO_PROCESS, 0):
        probe = subprocess.run([sys.executable, "-c", f"import os; os.setpriority(os.PRIO_PROCESS, 0, {a.nice})"],
                               capture_output=True)
        if probe.returncode:
            print(f"bench.cluster: --nice={a.nice}: this user may not raise a process's priority; use --nice 0",
                  file=sys.stderr)
            sys.exit(2)
    from bench import validity

    checks = [validity.quiet_before()]
    t, load0 = time.time(), os.getloadavg()[0]
    before, others = validity.cpu_times(), validity.Others()
    torch.set_num_threads(1)
    cost_sets: dict[str, StageCosts] = {}
    tiny_info = None
    for c in a.costs:
        if c == "table":
            cost_sets[c] = StageCosts.table(round(a.unit_ms * 1000))
        else:
            cost_sets[c], tiny_info = profile_tiny()
            print(f"bench.cluster: deepseek_v3_tiny stage costs {cost_sets[c]}", flush=True)
    rows, p2p = [], {}
    for pp in a.pp:
        print(f"bench.cluster: PP={pp}", flush=True)
        data = run_cluster(pp, a.schedules, cost_sets, a.steps, a.warmup, a.chunks_per_pp, a.timeout, a.nice,
                           a.device, a.queue, a.link_us)
        p2p[pp] = data["p2p_us"]
        rows += rows_for(data, pp, cost_sets, a.schedules, a.chunks_per_pp, a.device)
    checks += [others.check(), validity.no_steal(before, validity.cpu_times())]
    return report(a, rows, p2p, tiny_info, cost_sets, (load0, os.getloadavg()[0]), argv, time.time() - t, checks)


if __name__ == "__main__":
    main()
