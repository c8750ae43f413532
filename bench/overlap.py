"""Hiding the expert all-to-all inside DualPipe's F&B pairs (V3 §3.2.1, Figure 4): with overlap, without, and
torch's ScheduleDualPipeV.

    python -m bench.overlap [--chunks 8 --steps 4 --latency-us 3000 --gbps 1 ...]

4 processes (pp=2 x dp=2, ep=2: each pipeline rank's experts are split over its 2 data-parallel ranks), the tiny
DeepSeek-V3 (conf/model/deepseek_v3_tiny.yaml with 5 layers, MTP off), fp32, one thread per process. Every expert exchange goes
through an emulated interconnect (parallel/comm.py EmulatedLink: it completes no earlier than latency + bytes /
bandwidth after its start, the delay lying on the communication side), set so that one all-to-all lasts about as
long as a compute piece of a chunk: on 2 cores shared by 4 processes gloo alone moves the rows through memory and
there is nothing to hide.

Variants, measured in interleaved rounds (one step of each per round) so that machine load drifts over all alike:
  ours DualPipe / DualPipeV, overlap     parallel.overlap: the F&B actions interleave two chunks (schedules/overlap.py)
  ours DualPipe / DualPipeV, no overlap  every exchange waited for right after it starts
  torch ScheduleDualPipeV               torch.distributed.pipelining on the same 4-part split as our DualPipeV; its
                                        F&B pairs run one after the other (no overlap function registered)

Hidden fraction = 1 - (time blocked in wait(), at most the exchange's own time) / (exchange time, start to
completion), from the exchange traces; "steady state" counts the exchanges started inside F&B actions, "all" every
exchange of the step. The per-layer token-count exchange (the host sync before a dispatch, see parallel/expert.py)
travels under a turn of the other chunk, like the rows; reported with and without it.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from bench.common import OUT, compose, machine, write_report
from parallel.mesh import free_port

VARIANTS = [("ours DualPipe, overlap", "dualpipe", True), ("ours DualPipe, no overlap", "dualpipe", False),
            ("ours DualPipeV, overlap", "dualpipev", True), ("ours DualPipeV, no overlap", "dualpipev", False),
            ("torch ScheduleDualPipeV", "torch", False)]


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


# ------------------------------------------------------------------------------------------- one variant
class OursStep:
    """One training step of our executor, traced: run the rank's actions, sum mirror copies, reduce over dp."""

    def __init__(self, model, mesh, cfg, overlap: bool):
        from framework.step import PipelineStep

        self.mesh, self.step = mesh, PipelineStep(model, mesh, cfg)
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


def build_variant(name, schedule, overlap, mesh, a, link, recorder):
    from framework.models import build_model
    from parallel.expert import apply_expert_parallel

    cfg = config(a, schedule)
    torch.manual_seed(0)
    model = apply_expert_parallel(build_model(cfg.model), mesh, link=link, recorder=recorder)
    return TorchStep(model, mesh, cfg, a) if schedule == "torch" else OursStep(model, mesh, cfg, overlap)


# ------------------------------------------------------------------------------------------- measurement
KINDS = ("counts", "dispatch", "combine", "dispatch.backward", "combine.backward")


def exchange_kind(name: str) -> str:
    """'layers.3.moe.dispatch.backward' -> 'dispatch.backward' (the longest matching suffix of KINDS)."""
    return max((k for k in KINDS if name.endswith("." + k) or name == k), key=len, default="other")


def exchange_stats(records, t0: float, spans) -> dict:
    """Seconds of exchange time and of waiting, for every exchange and for those started inside an F&B action."""
    fb = [(s, e) for s, e, label in spans if "&" in label]
    out: dict[str, float] = {}
    for r in records:
        start = r.start - t0
        # exposed: the part of the exchange the caller sat waiting for; a wait can outlast the exchange by the
        # thread's wake-up delay on a loaded machine, which is not communication
        exposed = min(r.waited, r.duration)
        kinds = ["all"] + ([] if r.name.endswith(".counts") else ["payload"]) + [exchange_kind(r.name)]
        scopes = ["step"] + (["fb"] if any(s <= start <= e for s, e in fb) else [])
        for scope in scopes:
            for kind in kinds:
                out[f"{scope}_{kind}_comm"] = out.get(f"{scope}_{kind}_comm", 0.0) + r.duration
                out[f"{scope}_{kind}_wait"] = out.get(f"{scope}_{kind}_wait", 0.0) + exposed
    return out


def _worker(rank: int, port: int, a, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import logging

    import torch.distributed as dist

    from parallel import comm
    from parallel.mesh import init_mesh

    logging.getLogger("parallel.comm").setLevel(logging.ERROR)
    mesh = init_mesh(2, 2, 2, device="cpu", backend="gloo")
    link = comm.EmulatedLink(a.latency_us, a.gbps)
    variants = [v for v in VARIANTS if (v[1] != "torch" or not a.no_torch) and (not a.only or v[0] in a.only)]
    recorders = [comm.CommRecorder() for _ in variants]
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
                stats[v].append(exchange_stats(recorders[v].records, t0, spans))
                traced[v].append((t0, spans, [(r.start, r.end, r.name) for r in recorders[v].records]))
    rows, median_step = [], []
    for v, (name, schedule, overlap) in enumerate(variants):
        steps_max = torch.tensor(times[v], dtype=torch.float64)
        dist.all_reduce(steps_max, op=dist.ReduceOp.MAX)               # a step ends when the slowest rank ends
        median_step.append(int((steps_max - steps_max.median()).abs().argmin()))
        keys = [f"{scope}_{kind}_{x}" for scope in ("step", "fb") for kind in ("all", "payload", *KINDS)
                for x in ("comm", "wait")]
        sums = torch.tensor([sum(s.get(k, 0.0) for s in stats[v]) for k in keys], dtype=torch.float64)
        dist.all_reduce(sums)                                            # over steps and ranks
        rows.append(dict(name=name, step_s=float(steps_max.median()), steps=[float(x) for x in steps_max],
                         **{k: float(x) for k, x in zip(keys, sums)}))
    # the timelines of the median step, aligned across ranks by wall clock
    t_wall = time.time() - time.perf_counter()                           # perf_counter -> wall clock offset
    lines = {}
    for v, (name, schedule, overlap) in enumerate(variants):
        if schedule == "torch":
            continue
        t0, spans, recs = traced[v][median_step[v]]
        lines[name] = ([(t_wall + t0 + s, t_wall + t0 + e, lab) for s, e, lab in spans],
                       [(t_wall + s, t_wall + e, n) for s, e, n in recs])
    torch.save({"rows": rows, "lines": lines}, os.path.join(outdir, f"{rank}.pt"))
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
    """Spawn the 4 workers for the settings in `a`; returns each rank's results."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(free_port(), a, outdir), nprocs=4, join=True)
        return [torch.load(os.path.join(outdir, f"{r}.pt")) for r in range(4)]


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8, help="micro-batches per step (DualPipe: even, >= 4)")
    p.add_argument("--micro", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--latency-us", type=float, default=3000.0, help="emulated link latency per exchange")
    p.add_argument("--gbps", type=float, default=1.0, help="emulated link bandwidth, gigabits/s")
    p.add_argument("--no-torch", action="store_true", help="leave out torch's ScheduleDualPipeV")
    p.add_argument("--sweep-latency-us", type=float, nargs="*", default=[300.0, 1000.0],
                   help="after the main run, ours DualPipe with and without overlap at these link latencies")
    a = p.parse_args(argv)
    a.only = None
    if a.chunks % 2 or a.chunks < 4:
        raise ValueError(f"--chunks={a.chunks}: DualPipe on 2 pipeline ranks needs an even number >= 4")
    per_rank = measure(a)
    rows = per_rank[0]["rows"]
    sweep = []
    for latency in a.sweep_latency_us:
        b = argparse.Namespace(**{**vars(a), "latency_us": latency,
                                  "only": ["ours DualPipe, overlap", "ours DualPipe, no overlap"]})
        sweep.append((latency, measure(b)[0]["rows"]))
    OUT.mkdir(exist_ok=True)
    png, png_off = OUT / "overlap_timeline.png", OUT / "overlap_timeline_no_overlap.png"
    link = f"latency {a.latency_us:g} us + bytes / {a.gbps:g} Gb/s per exchange"
    draw(per_rank, "ours DualPipe, overlap", png, "DualPipe with F&B overlap (grey: expert exchanges)")
    draw(per_rank, "ours DualPipe, no overlap", png_off, "DualPipe without overlap (grey: expert exchanges)")
    tokens = a.micro * a.seq
    head = (f"4 processes (pp=2 x dp=2, ep=2), deepseek_v3_tiny with {LAYERS} layers (1 dense + {LAYERS - 1} MoE: hidden "
            f"128, 8 routed experts top-2 + 1 shared, MLA) and no MTP, cut {PARTS['dualpipe']} for DualPipe and "
            f"{PARTS['dualpipev']} for DualPipeV and torch (every part of an F&B pair holds as many MoE blocks as the "
            f"other), fp32, 1 thread per process, {a.chunks} micro-batches of {a.micro} x {a.seq} tokens per "
            f"replica and step ({tokens} tokens per chunk), median of {a.steps} interleaved steps after {a.warmup} "
            f"warm-up. Emulated link on every expert exchange: {link} (parallel.comm.EmulatedLink).\n\n")
    table = ["| variant | step ms (median, slowest rank) | hidden, steady state (F&B): dispatch + combine | "
             "steady state: + token counts | whole step: dispatch + combine | whole step: + token counts | "
             "exchange ms per rank-step | exposed ms per rank-step |", "|---|---|---|---|---|---|---|---|"]
    n = 4 * a.steps
    for r in rows:
        hidden = [pct(r[f"{scope}_{kind}_wait"], r[f"{scope}_{kind}_comm"])
                  for scope in ("fb", "step") for kind in ("payload", "all")]
        table.append(f"| {r['name']} | {1e3 * r['step_s']:.0f} | " + " | ".join(hidden) +
                     f" | {1e3 * r['step_all_comm'] / n:.0f} | {1e3 * r['step_all_wait'] / n:.0f} |")
    table += ["", "Steady state (F&B) by exchange, hidden fraction / exchange ms per rank-step:", "",
              "| variant | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for r in rows:
        if r["fb_all_comm"] > 0:
            table.append(f"| {r['name']} | " + " | ".join(
                f"{pct(r[f'fb_{k}_wait'], r[f'fb_{k}_comm'])} / {1e3 * r[f'fb_{k}_comm'] / n:.0f}" for k in KINDS) + " |")
    if sweep:
        table += ["", f"Ours DualPipe at other link latencies (same bandwidth, separate runs of {a.steps} steps; steady "
                  "state): the hidden fraction is bounded by how much compute the other chunk has in each turn.", "",
                  "| link latency (us) | step ms, overlap | step ms, no overlap | exchange ms per rank-step | hidden: "
                  "dispatch + combine | hidden: + token counts |", "|---|---|---|---|---|---|"]
        for latency, srows in sweep:
            on, off = srows[0], srows[1]
            table.append(f"| {latency:g} | {1e3 * on['step_s']:.0f} | {1e3 * off['step_s']:.0f} | "
                         f"{1e3 * on['step_all_comm'] / n:.0f} | {pct(on['fb_payload_wait'], on['fb_payload_comm'])} | "
                         f"{pct(on['fb_all_wait'], on['fb_all_comm'])} |")
    notes = ("\n\nHidden = 1 - exposed / exchange time (start to completion), summed over ranks and measured steps; "
             "exposed = time blocked in wait(), capped at the exchange's own time (a wait also holds the thread's "
             "wake-up delay, which on this shared machine is not communication). Steady state: exchanges started inside F&B actions (for variants without overlap the "
             "same actions run forward then backward; torch's schedule has no such span: '-'); whole step: every "
             "exchange. Dispatch + combine: the token rows, forward and backward; '+ token counts' adds the "
             "per-layer count exchange before each dispatch (the host sync). What bounds the hidden fraction whatever the "
             "order of the turns: per MoE block the forward chunk's own exchanges form a chain (counts, then rows, "
             "then combine, each needing the one before and the compute between them), so a block-pair lasts at "
             "least that chain, while the thread has only both chunks' compute to fill it with; when the chain of "
             "three exchanges is longer than the two chunks' compute, the difference is exposed. On 2 cores shared by 4 processes compute cannot speed up, so the step time "
             "gains only what the emulated link would have cost in waits (PLATFORM.md). Timelines of the median step: "
             f"`bench/out/{png.name}` (overlap) and `bench/out/{png_off.name}`, rows = global ranks 0-3 "
             "(pipeline rank = rank // 2), grey bars = exchanges.")
    command = "python -m bench.overlap" + ("" if argv is None else " " + " ".join(argv))
    text = (f"## Expert all-to-all hidden in DualPipe's F&B pairs (bench/overlap.py)\n\n{head}" + "\n".join(table)
            + notes + f"\n\nCommand: `{command}`; machine: {machine()} (main process; workers 1 thread).\n")
    write_report("overlap", text)
    return text


if __name__ == "__main__":
    main()
