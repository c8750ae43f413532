"""Hiding the expert all-to-all inside DualPipe's F&B pairs (V3 §3.2.1, Figure 4): with overlap, without, and
torch's ScheduleDualPipeV.

    python -m bench.overlap [--chunks 8 --steps 10 --latency-us 1000 --gbps 1 --sweep-latency-us 300 3000 ...]

4 processes (pp=2 x dp=2, ep=2: each pipeline rank's experts are split over its 2 data-parallel ranks), the tiny
DeepSeek-V3 (conf/model/deepseek_v3_tiny.yaml with 5 layers, MTP off), fp32, one thread per process. Every expert
exchange goes through an emulated interconnect (parallel/exchanges.py EmulatedLink: it completes no earlier than
latency + bytes / bandwidth after its start, the delay lying on the communication side), set so that one all-to-all
lasts about as long as a compute piece of a chunk (1 ms + 1 Gb/s: ~1.5 ms per exchange, against 1-4 ms per turn); on 2
cores shared by 4 processes gloo alone moves the rows through memory and there is little to hide. Each process is
pinned to one core (--no-pin to leave placement to the OS), ranks that exchange data on different cores: a peer is
then descheduled only while a rank it never talks to runs, not while its own partner does.

Variants, measured in interleaved rounds (one step of each per round) so that machine load drifts over all alike:
  ours DualPipe / DualPipeV, overlap     parallel.overlap: the F&B actions interleave two chunks (schedules/overlap.py)
  ours DualPipe / DualPipeV, no overlap  every exchange waited for right after it starts
  ..., padded dispatch                   parallel.comm.dispatch=padded: no token-count exchange before the rows
  torch ScheduleDualPipeV               torch.distributed.pipelining on the same 4-part split as our DualPipeV; its
                                        F&B pairs run one after the other (no overlap function registered)

Hidden fraction = 1 - exposed / (exchange time, start to completion), exposed = the time blocked in wait() while
the exchange was in progress, from the exchange traces; "steady state" counts the exchanges started inside F&B
actions, "whole step" every exchange of the step. The exposed time is split into waiting for a late peer (before
the other rank of the ep group had started the same exchange) and the rest.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from bench.common import OUT, compose, machine, write_report
from parallel.mesh import free_port

# (name, schedule, overlap, dispatch layout: parallel.comm.dispatch)
VARIANTS = [("ours DualPipe, overlap, padded dispatch", "dualpipe", True, "padded"),
            ("ours DualPipe, no overlap, padded dispatch", "dualpipe", False, "padded"),
            ("ours DualPipe, overlap", "dualpipe", True, "counts"),
            ("ours DualPipe, no overlap", "dualpipe", False, "counts"),
            ("ours DualPipeV, overlap, padded dispatch", "dualpipev", True, "padded"),
            ("ours DualPipeV, overlap", "dualpipev", True, "counts"),
            ("ours DualPipeV, no overlap", "dualpipev", False, "counts"),
            ("torch ScheduleDualPipeV", "torch", False, "counts")]

ON, OFF = VARIANTS[0][0], VARIANTS[1][0]   # the pair the timelines show
SWEEP = [ON, VARIANTS[2][0], OFF]           # measured again at the other link latencies


# 1 dense + 4 MoE blocks, cut so that every part of an F&B pair holds as many MoE blocks as the other: DualPipe's 2
# parts hold 2 each (the first also the dense block), DualPipeV's 4 parts 1 each
LAYERS = 5
PARTS = {"dualpipe": "[3,2]", "dualpipev": "[2,1,1,1]"}


def config(a, schedule: str):
    schedule = "dualpipev" if schedule == "torch" else schedule
    return compose("model=deepseek_v3_tiny", f"model.num_hidden_layers={LAYERS}", "model.num_nextn_predict_layers=0",
                   f"data.vocab_size={a.vocab}", f"train.seq_len={a.seq}", f"train.micro_batches={a.chunks}",
                   f"train.global_batch_size={a.micro * a.chunks * 2}", "parallel.pp=2", "parallel.dp=2",
                   "parallel.ep=2", f"parallel.schedule={schedule}", f"parallel.layers_per_part={PARTS[schedule]}")


def block_workload(a):
    """fn() = forward + backward of one MoE block on one micro-batch, in this process (no exchange): the compute
    that the turns of an F&B pair are made of, timed alone in the main process and in each worker."""
    from framework.models import build_model

    cfg = config(a, "dualpipe")
    torch.manual_seed(0)
    block = build_model(cfg.model).layers[1]
    h = torch.randn(a.micro, a.seq, cfg.model.hidden_size, requires_grad=True)

    def fn():
        block(h).sum().backward()
    return fn


# ------------------------------------------------------------------------------------------- one variant
class OursStep:
    """One training step of our executor, traced: run the rank's actions, sum mirror copies, reduce over dp."""

    def __init__(self, model, mesh, cfg, overlap: bool):
        from framework.parallelize import pipeline_step

        self.mesh, self.step = mesh, pipeline_step(model, cfg, mesh)
        for part in self.step.stages.values():
            part.overlap = overlap

    def run(self, batches):
        from parallel.data_parallel import reduce_gradients

        s = self.step
        inputs = {mb: (batches[mb][0],) for mb in s.first_mbs}
        labels = {mb: (batches[mb][0], batches[mb][1]) for mb in s.last_mbs}
        result = s.executor.run(s.actions, s.n, inputs, labels, train=True, trace=True,
                                grads_ready=s.mirror.stage_done if s.mirror else None)
        if s.mirror is not None:
            s.mirror.finish()
        reduce_gradients(s.named_parameters(), self.mesh)
        for _, p in s.named_parameters():
            p.grad = None
        spans = [(a, b, str(x)) for a, b, x in result.compute_spans]
        return s.executor._t0, spans


class TorchLast(torch.nn.Module):
    """The last part for torch's schedule: blocks, final norm and head -> logits (the loss is its loss_fn)."""

    def __init__(self, part):
        super().__init__()
        self.part = part
        self.norm, self.lm_head = part.norm, part.lm_head

    def forward(self, h):
        for layer in self.part.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


class TorchStep:
    """torch.distributed.pipelining.ScheduleDualPipeV over our 4 model parts (rank r: parts r and 3 - r)."""

    def __init__(self, model, mesh, cfg, a):
        from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

        from framework.models.deepseek_v3.mtp import token_loss
        from schedules.stage import split_model

        self.mesh = mesh
        parts = split_model(model, 4, cfg.parallel.layers_per_part)
        for part in parts:
            part.overlap = False  # plain modules: torch's schedule runs each chunk's forward and backward itself
        r = mesh.pp_rank
        micro, C = a.micro, cfg.model.hidden_size
        ids = torch.zeros(micro, a.seq, dtype=torch.long)
        h = torch.zeros(micro, a.seq, C, requires_grad=True)   # received activations need gradients
        logits = torch.zeros(micro, a.seq, cfg.model.vocab_size)
        stages = []
        for s in (r, 3 - r):
            module = TorchLast(parts[s]) if s == 3 else parts[s]
            stages.append(PipelineStage(module, s, 4, torch.device("cpu"), input_args=(ids if s == 0 else h,),
                                        output_args=(logits if s == 3 else h,), group=mesh.pp_group))
        self.modules = [st.submod for st in stages]
        self.schedule = ScheduleDualPipeV(stages, a.chunks, loss_fn=token_loss)

    def run(self, batches):
        from parallel.data_parallel import reduce_gradients

        t0 = time.perf_counter()
        if self.mesh.pp_rank == 0:  # holds the first and the last part
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            self.schedule.step(x, target=y)
        else:
            self.schedule.step()
        named = [(n, p) for m in self.modules for n, p in m.named_parameters()]
        reduce_gradients(named, self.mesh)
        for _, p in named:
            p.grad = None
        return t0, []


def build_variant(name, schedule, overlap, layout, mesh, a, link, recorder):
    from framework.models import build_model
    from framework.models.expert_parallel import apply_expert_parallel

    cfg = config(a, schedule)
    torch.manual_seed(0)
    model = apply_expert_parallel(build_model(cfg.model), mesh, link=link, recorder=recorder, layout=layout)
    return TorchStep(model, mesh, cfg, a) if schedule == "torch" else OursStep(model, mesh, cfg, overlap)


# ------------------------------------------------------------------------------------------- measurement
KINDS = ("counts", "dispatch", "combine", "dispatch.backward", "combine.backward")


def exchange_kind(name: str) -> str:
    """'layers.3.moe.dispatch.backward' -> 'dispatch.backward' (the longest matching suffix of KINDS)."""
    return max((k for k in KINDS if name.endswith("." + k) or name == k), key=len, default="other")


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def exchange_stats(records, posted: list[float], t0: float, spans) -> dict:
    """Seconds of exchange time and of waiting, for every exchange and for those started inside an F&B action.

    posted[i]: when the last rank of the group started exchange i (every ep peer issues the same exchanges in the
    same order); until then the exchange waits for a late peer, not for the link."""
    fb = [(s, e) for s, e, label in spans if "&" in label]
    out: dict[str, float] = {}
    for r, both in zip(records, posted):
        start = r.start - t0
        # exposed: the part of the exchange the caller sat waiting for, i.e. the wait inside [start, end]; a wait
        # also holds the thread's wake-up delay after the end, which on a loaded machine is not communication
        wait = (r.wait_start, r.wait_start + r.waited) if r.waited > 0 else (r.start, r.start)
        values = {"comm": r.duration, "wait": _overlap(*wait, r.start, r.end),
                  "late": _overlap(*wait, r.start, both), "own": max(0.0, r.end - max(r.start, both)),
                  "ownwait": _overlap(*wait, max(r.start, both), r.end), "rawwait": r.waited}
        kinds = ["all"] + ([] if r.name.endswith(".counts") else ["payload"]) + [exchange_kind(r.name)]
        scopes = ["step"] + (["fb"] if any(s <= start <= e for s, e in fb) else [])
        for scope in scopes:
            for kind in kinds:
                for x, v in values.items():
                    out[f"{scope}_{kind}_{x}"] = out.get(f"{scope}_{kind}_{x}", 0.0) + v
    return out


def posted_times(records, group) -> list[float]:
    """For each exchange of this rank, when the last rank of the expert-parallel group started it. Records are kept
    in the order they were waited for, which is the same on every peer (the schedule is)."""
    import torch.distributed as dist

    mine = [(r.name, r.start) for r in records]
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if any([n for n, _ in peer] != [n for n, _ in mine] for peer in every):
        raise RuntimeError("expert-parallel peers issued different exchanges: the schedule must be identical")
    return [max(peer[i][1] for peer in every) for i in range(len(mine))]


def _worker(rank: int, port: int, a, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    intended = None
    if a.pin and hasattr(os, "sched_setaffinity"):
        # ranks that exchange data on different cores: ep peers (same pipeline rank) and pipeline peers (same
        # replica) never share one, so a peer is descheduled only while a rank it never talks to runs
        cores = sorted(os.sched_getaffinity(0))
        pp_rank, dp_rank = divmod(rank, 2)
        intended = [cores[(pp_rank + dp_rank) % len(cores)]]
        os.sched_setaffinity(0, set(intended))
    in_force = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    import logging

    import torch.distributed as dist

    from parallel import exchanges
    from parallel.mesh import init_mesh

    logging.getLogger("parallel.mesh").setLevel(logging.ERROR)
    mesh = init_mesh(2, 2, 2, device="cpu", backend="gloo")
    from bench.validity import median_time, set_timer_slack_ns, sleep_overshoot_us

    slack = set_timer_slack_ns(1000)   # the link's delays are sleeps: wake within 1 us of the deadline, not 50 us
    # readings for the report's validity checks: this rank's block time alone (one rank at a time, so it measures
    # the core, not the sharing), then the link's sleep overshoot with every rank sleeping at once
    workload, block_alone = block_workload(a), float("nan")
    for turn in range(4):
        if turn == rank:
            block_alone = median_time(workload, n=30)
        dist.barrier()
    overshoot = sleep_overshoot_us(a.latency_us * 1e-6) if a.latency_us > 0 else (0.0, 0.0)
    dist.barrier()
    readings = {"intended": intended, "in_force": in_force, "block_alone_s": block_alone,
                "overshoot_us": overshoot, "timer_slack_ns": slack}
    link = exchanges.EmulatedLink(a.latency_us, a.gbps)
    variants = [v for v in VARIANTS if (v[1] != "torch" or not a.no_torch) and (not a.only or v[0] in a.only)]
    recorders = [exchanges.CommRecorder() for _ in variants]
    steps = [build_variant(*v, mesh, a, link, rec) for v, rec in zip(variants, recorders)]
    g = torch.Generator().manual_seed(1 + mesh.dp_rank)   # each data-parallel replica its own tokens
    batches = [(torch.randint(0, a.vocab, (a.micro, a.seq), generator=g),
                torch.randint(0, a.vocab, (a.micro, a.seq), generator=g)) for _ in range(a.chunks)]
    times = [[] for _ in variants]
    stats = [[] for _ in variants]
    traced = [[] for _ in variants]   # each measured step's spans, to draw the median step
    for i in range(a.warmup + a.steps):
        for v, step in enumerate(steps):
            dist.barrier()
            recorders[v].clear()
            t = time.perf_counter()
            t0, spans = step.run(batches)
            t = time.perf_counter() - t
            if i >= a.warmup:
                times[v].append(t)
                records = list(recorders[v].resolved())
                stats[v].append(exchange_stats(records, posted_times(records, mesh.ep_group), t0, spans))
                traced[v].append((t0, spans, [(r.start, r.end, r.name) for r in recorders[v].resolved()]))
    rows, median_step = [], []
    for v, (name, schedule, *_) in enumerate(variants):
        steps_max = torch.tensor(times[v], dtype=torch.float64)
        dist.all_reduce(steps_max, op=dist.ReduceOp.MAX)               # a step ends when the slowest rank ends
        median_step.append(int((steps_max - steps_max.median()).abs().argmin()))
        keys = [f"{scope}_{kind}_{x}" for scope in ("step", "fb") for kind in ("all", "payload", *KINDS)
                for x in ("comm", "wait", "late", "own", "ownwait", "rawwait")]
        sums = torch.tensor([sum(s.get(k, 0.0) for s in stats[v]) for k in keys], dtype=torch.float64)
        dist.all_reduce(sums)                                            # over steps and ranks
        rows.append(dict(name=name, step_s=float(steps_max.median()), steps=[float(x) for x in steps_max],
                         **{k: float(x) for k, x in zip(keys, sums)}))
    # the timelines of the median step, aligned across ranks by wall clock
    t_wall = time.time() - time.perf_counter()                           # perf_counter -> wall clock offset
    lines = {}
    for v, (name, schedule, *_) in enumerate(variants):
        if schedule == "torch":
            continue
        t0, spans, recs = traced[v][median_step[v]]
        lines[name] = ([(t_wall + t0 + s, t_wall + t0 + e, lab) for s, e, lab in spans],
                       [(t_wall + s, t_wall + e, n) for s, e, n in recs])
    torch.save({"rows": rows, "lines": lines, "readings": readings}, os.path.join(outdir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def draw(per_rank: list[dict], name: str, path, title: str) -> None:
    from schedules.timeline import draw_gantt

    timelines = [r["lines"][name][0] for r in per_rank]
    comm = [r["lines"][name][1] for r in per_rank]
    draw_gantt(timelines, str(path), title=title, comm=comm)


def pct(wait: float, total: float) -> str:
    return f"{100 * (1 - wait / total):.0f}%" if total > 0 else "-"


def measure(a) -> list[dict]:
    """Spawn the 4 workers for the settings in `a`; returns each rank's results, rank 0's with the validity checks
    of this spawn under "checks"."""
    from bench import validity as V

    torch.set_num_threads(1)
    alone = V.median_time(block_workload(a), n=30)    # the main process, alone on the machine
    quiet = V.quiet_before()
    before, others = V.cpu_times(), V.Others()
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(free_port(), a, outdir), nprocs=4, join=True)
        per_rank = [torch.load(os.path.join(outdir, f"{r}.pt")) for r in range(4)]
    per_rank[0]["checks"] = run_checks(a, [quiet, others.check(), V.no_steal(before, V.cpu_times())], alone,
                                       [r["readings"] for r in per_rank])
    return per_rank


def run_checks(a, host: list, alone: float, readings: list[dict]) -> list:
    """The spawn's validity checks (bench/validity.py): quiet machine, no steal, every rank's core as fast as the
    main process's, the link's sleeps close to what they model, the pinning asked for in force."""
    from bench.validity import Check

    slowest = max(r["block_alone_s"] for r in readings)
    over = max(r["overshoot_us"][0] for r in readings)
    limit_us = max(50.0, 0.1 * a.latency_us)
    checks = [*host,
              Check("one MoE block fwd+bwd alone: slowest rank / main process", f"{slowest / alone:.2f} "
                    f"({1e3 * slowest:.2f} / {1e3 * alone:.2f} ms)", "< 1.25", slowest / alone < 1.25),
              Check(f"sleep overshoot of the emulated link ({a.latency_us:g} us), median, worst rank",
                    f"{over:.0f} us (timer slack {readings[0]['timer_slack_ns']} ns)", f"< {limit_us:.0f} us",
                    over < limit_us)]
    if a.pin:
        pinned = [r["in_force"] == r["intended"] for r in readings]
        checks.append(Check("pinning in force (cores of ranks 0-3)", " ".join(str(r["in_force"]) for r in readings),
                            "as intended: " + " ".join(str(r["intended"]) for r in readings), all(pinned)))
    return checks


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per step (DualPipe: even, >= 4)")
    p.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--latency-us", type=float, default=1000.0, help="emulated link latency per exchange")
    p.add_argument("--gbps", type=float, default=1.0, help="emulated link bandwidth, gigabits/s")
    p.add_argument("--no-torch", action="store_true", help="leave out torch's ScheduleDualPipeV")
    p.add_argument("--sweep-latency-us", type=float, nargs="*", default=[300.0, 3000.0],
                   help="after the main run, ours DualPipe (padded and counts with overlap, padded without) at these "
                        "link latencies")
    p.add_argument("--repeats", type=int, default=3,
                   help="spawns per link latency for ours DualPipe (padded and counts with overlap, padded without)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="pin each process to one core, ranks that exchange data (ep and pipeline peers) on "
                        "different cores")
    p.add_argument("--only", nargs="*", default=None, metavar="VARIANT",
                   help="measure only these variants (names as in the report's first column)")
    a = p.parse_args(argv)
    unknown = set(a.only or ()) - {v[0] for v in VARIANTS}
    if unknown:
        raise ValueError(f"--only: unknown variants {sorted(unknown)}: allowed: {', '.join(v[0] for v in VARIANTS)}")
    if a.chunks % 2 or a.chunks < 4:
        raise ValueError(f"--chunks={a.chunks}: DualPipe on 2 pipeline ranks needs an even number >= 4")
    from bench.validity import checks_table, verdict

    per_rank = measure(a)
    rows = per_rank[0]["rows"]
    valid, why = verdict(per_rank[0]["checks"])
    # machine noise differs more between spawns than between the steps of one: the DualPipe variants again, in
    # separate spawns, at the main latency and at the others
    main_run = set(SWEEP) <= {r["name"] for r in rows}
    sweep = [(a.latency_us, 0, rows)] if main_run else []   # (latency, spawn, rows, (valid, why))
    for latency in sorted({a.latency_us, *a.sweep_latency_us}):
        for spawn in range(1 if latency == a.latency_us and main_run else 0, a.repeats):
            b = argparse.Namespace(**{**vars(a), "latency_us": latency, "only": SWEEP})
            res = measure(b)[0]
            sweep.append((latency, spawn, res["rows"], verdict(res["checks"])))
    if main_run:
        sweep[0] = (*sweep[0], (valid, why))
    sweep.sort(key=lambda x: x[:2])
    OUT.mkdir(exist_ok=True)
    png, png_off = OUT / "overlap_timeline.png", OUT / "overlap_timeline_no_overlap.png"
    link = f"latency {a.latency_us:g} us + bytes / {a.gbps:g} Gb/s per exchange"
    for name, path, title in ((ON, png, "DualPipe, overlap, padded dispatch (grey: exchanges)"),
                              (OFF, png_off, "DualPipe, no overlap, padded dispatch (grey: exchanges)")):
        if name in per_rank[0]["lines"]:
            draw(per_rank, name, path, title)
    tokens = a.micro * a.seq
    pinned = ("each process pinned to one core, ranks that exchange data on different cores (core of rank r = "
              "(pipeline rank + data-parallel rank) mod cores)" if a.pin else "processes not pinned")
    head = (f"4 processes (pp=2 x dp=2, ep=2), deepseek_v3_tiny with {LAYERS} layers (1 dense + {LAYERS - 1} MoE: hidden "
            f"128, 8 routed experts top-2 + 1 shared, MLA) and no MTP, cut {PARTS['dualpipe']} for DualPipe and "
            f"{PARTS['dualpipev']} for DualPipeV and torch (every part of an F&B pair holds as many MoE blocks as the "
            f"other), fp32, 1 thread per process, {pinned}, {a.chunks} micro-batches of {a.micro} x {a.seq} tokens "
            f"per replica and step ({tokens} tokens per chunk), median of {a.steps} interleaved steps after "
            f"{a.warmup} warm-up. Emulated link on every expert exchange: {link} (parallel.exchanges.EmulatedLink). "
            f"Dispatch layouts (parallel.comm.dispatch): 'counts' exchanges the token counts, then the routed rows; "
            f"'padded' sends every token once to each ep rank in a message of fixed size, without a count "
            f"exchange.\n\n")
    n = 4 * a.steps
    ms = lambda r, key: f"{1e3 * r[key] / n:.0f}"  # noqa: E731  (per rank-step)
    table = ["| variant | step ms (median, slowest rank) | hidden, steady state (F&B) | steady state, rows only | "
             "whole step | exchange ms per rank-step | exposed ms per rank-step | of which a late peer | hidden once "
             "both peers had started (steady state) |", "|---|---|---|---|---|---|---|---|---|"]
    hid = pct if valid else (lambda wait, total: "withheld")  # noqa: E731  (an invalid run's fractions mislead)
    for r in rows:
        table.append(f"| {r['name']} | {1e3 * r['step_s']:.0f} | {hid(r['fb_all_wait'], r['fb_all_comm'])} | "
                     f"{hid(r['fb_payload_wait'], r['fb_payload_comm'])} | "
                     f"{hid(r['step_all_wait'], r['step_all_comm'])} | {ms(r, 'step_all_comm')} | "
                     f"{ms(r, 'step_all_wait')} | {ms(r, 'step_all_late')} | "
                     f"{hid(r['fb_all_ownwait'], r['fb_all_own'])} |")
    table += ["", "Steady state (F&B) by exchange, hidden fraction / exchange ms per rank-step:", "",
              "| variant | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for r in rows:
        if r["fb_all_comm"] > 0:
            table.append(f"| {r['name']} | " + " | ".join(
                f"{hid(r[f'fb_{k}_wait'], r[f'fb_{k}_comm'])} / {ms(r, f'fb_{k}_comm')}"
                if r[f"fb_{k}_comm"] > 0 else "-" for k in KINDS) + " |")
    if sweep:
        table += ["", f"Ours DualPipe in separate spawns (spawn 0 at {a.latency_us:g} us is the run above), by link "
                  f"latency (same bandwidth, {a.steps} steps each; hidden fractions in the steady state):", "",
                  "| link latency (us) | spawn | step ms: padded, overlap | counts, overlap | padded, no overlap | "
                  "hidden: padded | hidden: counts | padded, once both peers had started | exchange ms per rank-step "
                  "(padded) | exposed ms per rank-step (padded): all / a late peer | valid |", "|---" * 11 + "|"]
        for latency, spawn, srows, (ok, reason) in sweep:
            by = {r["name"]: r for r in srows}
            pad, cnt, off = by[SWEEP[0]], by[SWEEP[1]], by[SWEEP[2]]
            h = pct if ok else (lambda wait, total: "withheld")  # noqa: E731
            table.append(f"| {latency:g} | {spawn} | {1e3 * pad['step_s']:.0f} | {1e3 * cnt['step_s']:.0f} | "
                         f"{1e3 * off['step_s']:.0f} | {h(pad['fb_all_wait'], pad['fb_all_comm'])} | "
                         f"{h(cnt['fb_all_wait'], cnt['fb_all_comm'])} | "
                         f"{h(pad['fb_all_ownwait'], pad['fb_all_own'])} | {ms(pad, 'step_all_comm')} | "
                         f"{ms(pad, 'step_all_wait')} / {ms(pad, 'step_all_late')} | "
                         f"{'yes' if ok else 'no: ' + reason} |")
    if sweep:
        def spread(latency, name):
            vals = [100 * (1 - by[name]["fb_all_wait"] / by[name]["fb_all_comm"]) for lat, _, srows, (ok, _) in sweep
                    if lat == latency and ok for by in [{r["name"]: r for r in srows}]]
            n = sum(1 for lat, *_ in sweep if lat == latency)
            if not vals:
                return f"none of {n} spawns valid"
            return f"{min(vals):.0f}-{max(vals):.0f}% ({len(vals)} of {n} spawns valid)"
        table += ["", "Reading: hidden fraction in the steady state over the valid spawns above (min-max), DualPipe "
                  "with overlap, padded / counts dispatch: " + "; ".join(
                      f"{lat:g} us: {spread(lat, SWEEP[0])} / {spread(lat, SWEEP[1])}"
                      for lat in sorted({lat for lat, *_ in sweep})) + "." + (
                      " Counting every second spent in wait(), the wake-up delay after completion included, the run "
                      "above gives " + ", ".join(f"{r['name']} {pct(r['fb_all_rawwait'], r['fb_all_comm'])}"
                                                  for r in rows if r["name"] in SWEEP[:2]) + "." if valid else "")]
    notes = ("\n\nHidden = 1 - exposed / exchange time (start to completion), summed over ranks and measured steps; "
             "exposed = the time the caller sat in wait() while the exchange was in progress (a wait also holds the "
             "thread's wake-up delay after completion, which on this shared machine is not communication). Steady "
             "state: exchanges started inside F&B actions (for variants without overlap the same actions run "
             "forward then backward; torch's schedule has no such span: '-'); whole step: every exchange, including "
             "the warm-up and cool-down phases where there is no other chunk to compute. Rows only: without the "
             "count exchanges. 'Of which a late peer': the part of the exposed time before the other rank of the ep "
             "group had started the same exchange (every peer issues them in the same order, so the k-th exchanges "
             "match); with 4 processes time-sharing 2 cores a peer is often descheduled, which a GPU node does not "
             "do. 'Hidden once both peers had started' counts only the exchange's own time and waits after that "
             "point. What bounds the hidden fraction whatever the order of the turns: per MoE block the forward "
             "chunk's own exchanges form a chain (with the counts layout: counts, then rows, then combine; padded: "
             "rows, then combine), each needing the one before and the compute between them, so a block-pair lasts "
             "at least that chain, while the thread has only both chunks' compute to fill it with. On 2 cores "
             "shared by 4 processes compute cannot speed up, so the step time gains only what the emulated link "
             "would have cost in waits. Timelines of the median step: "
             f"`bench/out/{png.name}` (overlap) and `bench/out/{png_off.name}`, rows = global ranks 0-3 "
             "(pipeline rank = rank // 2), grey bars = exchanges.")
    args = sys.argv[1:] if argv is None else argv
    command = "python -m bench.overlap" + ("" if not args else " " + " ".join(f"'{x}'" if " " in x else x for x in args))
    validity = ("Validity of the run above (bench/validity.py; a failed check withholds its hidden fractions):\n\n"
                + checks_table(per_rank[0]["checks"])
                + ("\n\n" if valid else f"\n\n**Run not valid, hidden fractions withheld**: {why}.\n\n"))
    text = (f"## Expert all-to-all hidden in DualPipe's F&B pairs (bench/overlap.py)\n\n{head}{validity}"
            + "\n".join(table)
            + notes + f"\n\nCommand: `{command}`; machine: {machine()} (main process; workers 1 thread).\n")
    write_report("overlap", text)
    return text


if __name__ == "__main__":
    main()
