"""The drop-in API (`from schedules import DualPipe, DualPipeV`) against the one-process limit and the peers.

The workload a user of deepseek-ai/DualPipe would try first, on 2 processes x 1 thread, gloo: 8 residual MLP blocks
(hidden 256, ffn 1024, fp32), 8 micro-batches of [4, 64, 256], an SGD step after every pipeline step, and (as in the
reference library) DualPipe's two copies of a part keep their own gradients: nothing sums them.

    limit            one process runs all 8 blocks on all 8 micro-batches (forward, backward, SGD), divided by pp=2;
                     both ranks run it at once, each on its own core, as the pipelines do (the reference)
    limit, alone     the same on rank 0 while rank 1 idles: no second process shares the memory bus or the caches
    duet DualPipe    schedules.DualPipe: rank r holds (part r, part 1-r) of 2 parts
    duet DualPipeV   schedules.DualPipeV: rank r holds (part r, part 3-r) of 4 parts. Both as constructed by
                     default (weight_grad_split=True): the blocks' nn.Linear layers defer their weight gradients to
                     the schedule's W actions (zero bubble), as torch's ScheduleDualPipeV does for any module
      weight_grad_split=False  DualPipeV with the reference library's timing: only layers that hand their closure
                     to WeightGradStore defer (none here), so every backward computes its weight gradients at once
    torch            torch.distributed.pipelining ScheduleDualPipeV and Schedule1F1B
    DeepSpeed        deepspeed.pipe.PipelineModule (1F1B)

Efficiency = limit / step, taken round by round (every contender steps once per round, in a rotating order, both
ranks lined up by a barrier) so the drift of a shared machine's load cancels; the report gives its median and the
spread over rounds. Both ranks run the limit at the same time, each on its own core, as the pipelines do.

`--profile` adds where our executor's time goes (see `profile_rows`). After the timed rounds every duet schedule
steps once more from fresh weights with weight_grad_split True and False: the report gives each rank's peak
allocation during that step (torch.profiler's memory events) and checks that losses and gradients are bitwise equal.

    python -m bench.dropin [--rounds 30] [--profile] [--only duet-dualpipe limit ...]
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

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from bench import validity
from bench._pipeline_peers import build_peer
from bench.common import machine, write_report
from bench.pipeline import make_blocks, make_micro_batches
from parallel.mesh import free_port

LR = 1e-3
CONTENDERS = {            # key -> name in the report
    "limit": "one process / 2 (limit)",
    "limit-alone": "one process / 2, the other core idle",
    "duet-dualpipe": "duet DualPipe",
    "duet-dualpipev": "duet DualPipeV",
    "duet-dualpipev-nosplit": "duet DualPipeV, weight_grad_split=False (the reference's timing)",
    "torch-dualpipev": "torch ScheduleDualPipeV",
    "torch-1f1b": "torch Schedule1F1B",
    "deepspeed-1f1b": "DeepSpeed 1F1B",
}


def _criterion(n: int):
    # each chunk's loss is back-propagated with gradient 1 (the library's convention): scale to the mean here
    return lambda out, y: F.mse_loss(out, y) / n


class Limit:
    """All the work in this one process: the reference every efficiency is measured against."""

    def __init__(self, blocks, micro_batches):
        self.model = nn.Sequential(*(copy.deepcopy(b) for b in blocks))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.micro_batches, self.loss = micro_batches, _criterion(len(micro_batches))

    def step(self) -> None:
        for x, y in self.micro_batches:
            self.loss(self.model(x), y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Duet:
    """schedules.DualPipe / DualPipeV used exactly as deepseek-ai/DualPipe's example uses its classes."""

    def __init__(self, kind: str, blocks, micro_batches, split: bool = True):
        import torch.distributed as dist

        import schedules

        rank, pp, n = dist.get_rank(), dist.get_world_size(), len(micro_batches)
        parts = 2 * pp if kind == "dualpipev" else pp
        held = (rank, parts - 1 - rank)
        per = len(blocks) // parts
        modules = tuple(nn.Sequential(*(copy.deepcopy(b) for b in blocks[p * per:(p + 1) * per])) for p in held)
        cls = schedules.DualPipeV if kind == "dualpipev" else schedules.DualPipe
        self.pipe = cls(modules) if split else cls(modules, weight_grad_split=False)
        schedules.set_p2p_tensor_shapes([tuple(micro_batches[0][0].shape)])
        schedules.set_p2p_tensor_dtype(torch.float32)
        self.opt = torch.optim.SGD(self.pipe.parameters(), lr=LR)
        x = torch.cat([x for x, _ in micro_batches])
        y = torch.cat([y for _, y in micro_batches])
        self.n, self.criterion = n, _criterion(n)
        self.args, self.labels = (), ()
        if kind == "dualpipev":
            if rank == 0:
                self.args, self.labels = (x,), (y,)
        else:  # direction 0 enters at rank 0 with the first half; direction 1 at the last rank with the second
            xs, ys = x.chunk(2), y.chunk(2)
            if rank == 0:
                self.args, self.labels = (xs[0],), (ys[1],)
            elif rank == pp - 1:
                self.args, self.labels = (xs[1],), (ys[0],)

    def pipe_step(self):
        """The pipeline's part of a step: (losses on this rank or None, outputs)."""
        return self.pipe.step(*self.args, num_chunks=self.n, criterion=self.criterion, labels=self.labels)

    def step(self) -> None:
        self.pipe_step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def profiled_step(self) -> dict:
        """One step with the executor's trace on: where this rank's wall time went (seconds)."""
        from schedules.actions import Action

        ex, results = self.pipe._executor, []
        run = ex.run
        ex.run = lambda *args, **kw: results.append(run(*args, **{**kw, "trace": True})) or results[-1]
        try:
            t0, main0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
            self.pipe.step(*self.args, num_chunks=self.n, criterion=self.criterion, labels=self.labels)
            t1 = time.perf_counter()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            t2, main2, proc2 = time.perf_counter(), time.thread_time(), time.process_time()
        finally:
            ex.run = run
        res = results[-1]
        compute: dict[str, float] = {}
        for s, e, what in res.trace:
            if isinstance(what, Action):
                op = "FB" if what.op == "FB" else what.op
                compute[op] = compute.get(op, 0.0) + e - s
        waits = sum(e - s for s, e, what in res.trace if isinstance(what, str))
        return dict(wall=t2 - t0, optimizer=t2 - t1, compute=compute, waits=waits, post=res.post_s,
                    main_cpu=main2 - main0, other_threads_cpu=(proc2 - proc0) - (main2 - main0))


def live_bytes(fn, marker: str):
    """Run fn() under torch.profiler's memory events (every allocation and free of torch's CPU allocator, on every
    thread). Returns (the most bytes allocated during fn above what was allocated when it started, the same live
    bytes at the start of each `record_function(marker)` range fn opens, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.profiler.kineto_results.events()
    starts = sorted(e.start_ns() for e in events if e.name() == marker)
    live = peak = 0
    at: list[int] = []
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        while len(at) < len(starts) and starts[len(at)] <= e.start_ns():
            at.append(live)
        live += e.nbytes()
        peak = max(peak, live)
    return peak, at + [live] * (len(starts) - len(at)), result


def allocations(duet: "Duet"):
    """live_bytes of one pipeline step of `duet`, marked at the start of each W action."""
    from torch.profiler import record_function

    ex = duet.pipe._executor
    do_w = ex._do_W

    def marked_w(a):
        with record_function("W action"):
            do_w(a)

    ex._do_W = marked_w
    try:
        return live_bytes(duet.pipe_step, "W action")
    finally:
        del ex._do_W


def split_memory(blocks, micro_batches) -> dict:
    """Each duet schedule steps once from fresh weights with weight_grad_split True and with False, on this rank:
    the peak allocation during each pipeline step; what the split holds until W (the most, over this rank's W
    actions, by which the live bytes at a W's start exceed those at the same W without the split); whether losses
    and gradients are bitwise the same."""
    import torch.distributed as dist

    out = {}
    for kind in ("dualpipe", "dualpipev"):
        runs = {}
        for split in (True, False):
            duet = Duet(kind, blocks, micro_batches, split=split)
            dist.barrier()
            peak, at_w, (loss, _) = allocations(duet)
            runs[split] = (peak, at_w, loss, [p.grad for p in duet.pipe.parameters()])
        (peak_t, at_w_t, loss_t, grads_t), (peak_f, at_w_f, loss_f, grads_f) = runs[True], runs[False]
        same_loss = loss_t is None and loss_f is None or (
            loss_t is not None and loss_f is not None and torch.equal(loss_t, loss_f))
        same_grads = len(grads_t) == len(grads_f) and all(torch.equal(x, y) for x, y in zip(grads_t, grads_f))
        held = max((t - f for t, f in zip(at_w_t, at_w_f)), default=0)
        out[kind] = dict(peak_split=peak_t, peak_nosplit=peak_f, held_for_w=held, bitwise=same_loss and same_grads)
    return out


def build(key: str, blocks, micro_batches):
    if key.startswith("limit"):
        return Limit(blocks, micro_batches)
    framework, schedule, *variant = key.split("-")
    if framework == "duet":
        return Duet(schedule, blocks, micro_batches, split=variant != ["nosplit"])
    return build_peer(framework, schedule, blocks, micro_batches, LR, optimizer="sgd")


# ---------------------------------------------------------------- the measured run (2 processes)
def _worker(rank: int, port: int, a, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_SIZE="2")
    if a.nice:  # before any thread starts (gloo's included): a thread inherits its creator's niceness
        os.setpriority(os.PRIO_PROCESS, 0, a.nice)
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=a.timeout))
    blocks, micro_batches = make_blocks(a), make_micro_batches(a)
    contenders = {}
    for key in a.only or CONTENDERS:
        contenders[key] = build(key, blocks, micro_batches)
        torch.set_num_threads(1)     # in case a peer's engine set its own thread count
    keys = list(contenders)
    times = {k: [] for k in keys}    # [round] -> (t0, t1) of this rank
    for r in range(a.warmup + a.rounds):
        k = r % len(keys)
        for key in keys[k:] + keys[:k]:
            dist.barrier()
            t0 = time.perf_counter()
            if key != "limit-alone" or rank == 0:
                contenders[key].step()
            t1 = time.perf_counter()
            if r >= a.warmup:
                times[key].append((t0, t1))
    if a.profile:
        for key in keys:
            if not hasattr(contenders[key], "profiled_step"):
                continue
            times[f"profile:{key}"] = []
            for _ in range(a.profile):
                dist.barrier()
                times[f"profile:{key}"].append(contenders[key].profiled_step())
    if any(key.startswith("duet-") for key in keys):
        times["memory"] = split_memory(blocks, micro_batches)
    gathered = [None, None]
    dist.all_gather_object(gathered, times)
    if rank == 0:
        with open(out_path, "wb") as f:
            pickle.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def round_seconds(gathered: list[dict], key: str) -> list[float]:
    """Seconds of each round's step: first rank's start to last rank's end (the limit: each rank's own run, mean)."""
    if key == "limit":
        return [statistics.mean(t1 - t0 for t0, t1 in ranks) for ranks in zip(*(g[key] for g in gathered))]
    if key == "limit-alone":
        return [t1 - t0 for t0, t1 in gathered[0][key]]
    # perf_counter is one clock for the whole machine (CLOCK_MONOTONIC), so the two ranks' stamps line up
    return [max(t1 for _, t1 in ranks) - min(t0 for t0, _ in ranks) for ranks in zip(*(g[key] for g in gathered))]


def quantiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], statistics.median(v), q[2]


PEERS = ("torch-dualpipev", "torch-1f1b", "deepspeed-1f1b")
GOALS = {"duet-dualpipe": 0.85, "duet-dualpipev": 0.80}


def report(a, gathered: list[dict], checks: list, load: tuple) -> str:
    keys = [k for k in CONTENDERS if k in gathered[0]]
    secs = {k: round_seconds(gathered, k) for k in keys}
    ms = {k: [x * 1e3 / (2 if k.startswith("limit") else 1) for x in secs[k]] for k in keys}

    def efficiency(k: str, ref: str) -> list[float]:   # round by round: limit / 2 over the step of the same round
        return [lim / x for lim, x in zip(ms[ref], ms[k])] if ref in ms else []

    rows = ["| contender | step ms, median | p25 - p75 | min - max | efficiency, median over rounds (p25 - p75) | "
            "vs the idle-core limit |", "|---|---|---|---|---|---|"]
    for k in keys:
        lo, med, hi = quantiles(ms[k])
        e, ea = efficiency(k, "limit"), efficiency(k, "limit-alone")
        eff = "1.00 (by definition)" if k == "limit" else (
            "{1:.2f} ({0:.2f} - {2:.2f})".format(*quantiles(e)) if e else "")
        alone = f"{statistics.median(ea):.2f}" if ea and k != "limit-alone" else ""
        rows.append(f"| {CONTENDERS[k]} | {med:.1f} | {lo:.1f} - {hi:.1f} | {min(ms[k]):.1f} - {max(ms[k]):.1f} | "
                    f"{eff} | {alone} |")
    goals = []
    for k, goal in GOALS.items():
        if k not in ms or "limit" not in ms:
            continue
        e = statistics.median(efficiency(k, "limit"))
        slower = [CONTENDERS[p] for p in PEERS if p in ms and statistics.median(
            [x / y for x, y in zip(ms[k], ms[p])]) > 1.0]
        goals.append(f"- {CONTENDERS[k]}: efficiency {e:.2f} (goal >= {goal:.2f}): {'met' if e >= goal else 'NOT met'}"
                     f"; at least as fast as every peer (median of round-by-round step ratios <= 1): "
                     + ("yes" if not slower else "no, slower than " + ", ".join(slower)))
    ok, why = validity.verdict(checks)
    profile = profile_rows(gathered, secs.get("limit"))
    memory = memory_rows(gathered)
    lines = ["## Drop-in pipeline efficiency (bench/dropin.py)\n",
             f"2 processes x 1 thread, gloo, {machine()}. {a.blocks} residual MLP blocks (hidden {a.hidden}, ffn "
             f"{a.ffn}), {a.microbatches} micro-batches of [{a.batch}, {a.seq}, {a.hidden}], SGD after every step; "
             f"DualPipe's copies keep their own gradients. {a.rounds} timed rounds after {a.warmup} warm-up, every "
             f"contender once per round in a rotating order. Load average {load[0]:.2f} before, {load[1]:.2f} after.\n",
             "```", "python -m bench.dropin " + " ".join(a.argv), "```", "", *rows, "", *goals, "",
             *memory, *profile, validity.checks_table(checks), ""]
    if not ok:
        lines.append(f"**The run is not valid**: {why}. The figures above are kept for reference only.\n")
    return "\n".join(lines)


def memory_rows(gathered: list[dict]) -> list[str]:
    """What weight_grad_split costs in memory, and that it changes no result (`split_memory`), per rank."""
    if "memory" not in gathered[0]:
        return []
    mib = 2 ** 20
    rows = ["weight_grad_split True vs False, one step from the same fresh weights (torch.profiler memory events; "
            "peak = most bytes allocated during the pipeline step above its start; held until W = the most by which "
            "the live bytes at the start of a W action exceed those at the same W without the split):\n",
            "| schedule | rank | peak MiB, False | peak MiB, True | held until W, MiB | losses and gradients |",
            "|---|---|---|---|---|---|"]
    for kind, name in (("dualpipe", "duet DualPipe"), ("dualpipev", "duet DualPipeV")):
        for rank, g in enumerate(gathered):
            m = g["memory"][kind]
            rows.append(f"| {name} | {rank} | {m['peak_nosplit'] / mib:.2f} | {m['peak_split'] / mib:.2f} | "
                        f"{m['held_for_w'] / mib:.2f} | {'bitwise equal' if m['bitwise'] else 'DIFFER'} |")
    return rows + [""]


def profile_rows(gathered: list[dict], limit) -> list[str]:
    """Where each duet contender's step goes, per rank, medians of the traced steps in ms.

    compute   the executor's actions (F, B, W, BW, FB) as traced; `vs limit` compares it with the same work done by
              one process (limit / 2): above 1.00, the same arithmetic ran slower inside the pipeline
    waits     blocked on a receive, or at the end on the last sends
    post      handing sends and receives to gloo (process-group send/recv)
    optimizer the SGD step after the pipeline
    rest      the executor's own Python between actions (bookkeeping) and the compat layer around it
    threads   CPU time of the process's other threads (gloo's, the send waiter's): taken from the same two cores
    """
    keys = [k[len("profile:"):] for k in gathered[0] if k.startswith("profile:")]
    if not keys:
        return []
    med = statistics.median
    half = med(limit) / 2 if limit else None     # limit: seconds of the whole work in one process
    rows = ["Where our time goes (`--profile`; medians of the traced steps, ms per rank; the trace itself costs a "
            "few us per action):\n",
            "| contender | rank | step | compute (F / B / BW / FB / W) | vs limit | waits | post | optimizer | rest "
            "| main-thread CPU | other threads' CPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        for rank, g in enumerate(gathered):
            steps = g[f"profile:{key}"]
            ops = {op: med(s["compute"].get(op, 0.0) for s in steps) * 1e3 for op in ("F", "B", "BW", "FB", "W")}
            comp = med(sum(s["compute"].values()) for s in steps)
            wall, waits, post, opt = (med(s[k] for s in steps) for k in ("wall", "waits", "post", "optimizer"))
            rest = med(s["wall"] - sum(s["compute"].values()) - s["waits"] - s["post"] - s["optimizer"]
                       for s in steps)
            vs = f"{comp / half:.2f}" if half else ""
            rows.append(f"| {CONTENDERS[key]} | {rank} | {wall * 1e3:.1f} | {comp * 1e3:.1f} ("
                        + " / ".join(f"{ops[o]:.0f}" for o in ops) + f") | {vs} | {waits * 1e3:.1f} | "
                        f"{post * 1e3:.1f} | {opt * 1e3:.1f} | {rest * 1e3:.1f} | "
                        f"{med(s['main_cpu'] for s in steps) * 1e3:.1f} | "
                        f"{med(s['other_threads_cpu'] for s in steps) * 1e3:.1f} |")
    return rows + [""]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="then this many traced steps of each duet contender: where its time goes")
    p.add_argument("--only", nargs="*", default=None, choices=list(CONTENDERS))
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the rank processes (-20..19; below 0 needs the right to raise priority): on a "
                        "shared machine, keeps other jobs off the measured cores")
    p.add_argument("--name", default="dropin", help="report name: bench/out/<name>.md")
    a = p.parse_args(argv)
    if not -20 <= a.nice <= 19:
        p.error(f"--nice={a.nice}: must be in -20..19")
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def main(argv=None) -> str:
    a = parse(argv)
    torch.set_num_threads(1)
    checks = [validity.quiet_before()]
    load0, before, others = os.getloadavg()[0], validity.cpu_times(), validity.Others()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.pkl")
        mp.spawn(_worker, args=(free_port(), a, path), nprocs=2, join=True)
        with open(path, "rb") as f:
            gathered = pickle.load(f)
    checks += [others.check(), validity.no_steal(before, validity.cpu_times())]
    text = report(a, gathered, checks, (load0, os.getloadavg()[0]))
    write_report(a.name, text)
    return text


if __name__ == "__main__":
    main()
