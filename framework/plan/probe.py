"""The cpu device measured the way a run's processes will experience it: all of them at once, over gloo.

`measure(processes)` starts that many processes (one thread each, as torchrun sets OMP_NUM_THREADS=1), joined in
one gloo group, and has them measure together:
  gemm, memory, op   a 1024^2 fp32 GEMM, an elementwise multiply of 16 MB tensors, the host time of one small
                     autograd operator and the run's own linears in their three passes (devices.compute_speeds:
                     medians of single calls, then medians over interleaved rounds), all processes at the same time
                     (they share the machine's cores as the ranks will); the slowest process's figures, since a
                     pipeline goes at its slowest rank's pace; with a model config, also the host time per operator
                     of that model's own layers (framework/plan/host.py)
  all-reduce         a 3-value float64 all-reduce over all processes, as the trainer runs several a step (loss,
                     gradient norm, expert loads): the median call
  p2p                a ping-pong between ranks 0 and 1 with 4-byte and 1 MiB messages: latency (half the median
                     round trip of the small message) and bandwidth (the large message's extra time)
  action             the pipeline executor's own time per action: a DualPipe step over all processes
                     (schedules.compat, the executor the trainer runs, with its weight-gradient split: W actions
                     run the deferred closures) whose modules compute next to nothing; the
                     per-action time h for which schedules.simulate, with the measured p2p latency, gives the
                     step's measured time (`action_overhead`)
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

SMALL, LARGE = 4, 2**20       # ping-pong message bytes
PINGS = 200
ALLREDUCES = 100


def action_overhead(step_s: float, pp: int, chunks: int, p2p_s: float) -> float:
    """The per-action host time h with which simulate() of DualPipe (pp ranks, `chunks` micro-batches, every
    compute action costing h, messages p2p_s) lasts step_s; 0 if the messages alone already take that long."""
    from schedules import build, get_layout
    from schedules.simulate import Costs, simulate

    actions, layout = build("dualpipe", pp, chunks), get_layout("dualpipe", pp)

    def makespan(h: float) -> float:
        return simulate(actions, layout, Costs(F=h, B=h, W=h, FB=h, p2p=p2p_s)).makespan
    lo, hi = 0.0, step_s
    if makespan(lo) >= step_s:
        return 0.0
    for _ in range(50):          # makespan grows with h: bisect to well below a microsecond
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if makespan(mid) < step_s else (lo, mid)
    return (lo + hi) / 2


def _median(fn, seconds: float) -> float:
    """Median seconds per call of fn over about `seconds` of calls (at least 5) after a warm-up. A median, as the
    run's step time is compared by its median: on a shared machine a process is at times descheduled for far longer
    than a call takes, and a mean would carry those pauses into every figure."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, store: str, out: str, chunks: int, shapes, host_model=None) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    from framework.plan.devices import compute_speeds

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    res = compute_speeds(_median, between=dist.barrier, shapes=shapes, host_model=host_model)
    dist.barrier()
    values, trips = torch.zeros(3, dtype=torch.float64), []
    for i in range(ALLREDUCES + 5):            # a fixed count: every rank must make the same collective calls
        t0 = time.perf_counter()
        dist.all_reduce(values)
        trips.append(time.perf_counter() - t0)
    res["allreduce_s"] = statistics.median(trips[5:])
    dist.barrier()

    from parallel.exchanges import ping_pong_s

    for size in (SMALL, LARGE):                         # ranks 0 and 1 bounce a message; the others wait
        res[f"oneway_{size}"] = ping_pong_s(torch.zeros(size // 4), rounds=PINGS, warmup=10)

    if world % 2 == 0:
        from schedules.compat import DualPipe, set_p2p_tensor_dtype, set_p2p_tensor_shapes

        torch.manual_seed(0)
        # the split the trainer runs: W actions hand back the linears' deferred weight gradients
        pipe = DualPipe((nn.Linear(4, 4), nn.Linear(4, 4)), weight_grad_split=True)
        set_p2p_tensor_shapes([(1, 4)])
        set_p2p_tensor_dtype(torch.float32)
        first, last = pipe.is_first_rank, pipe.is_last_rank
        half = chunks // 2
        inputs = torch.randn(half, 4) if first or last else None
        labels = (torch.randn(half, 4),) if first or last else ()
        times = []
        for i in range(25):
            dist.barrier()
            t0 = time.perf_counter()
            pipe.step(inputs, num_chunks=chunks, criterion=lambda o, t: (o - t).pow(2).mean(), labels=labels)
            times.append(time.perf_counter() - t0)
        res["pipeline_step_s"] = statistics.median(times[5:])
    dist.barrier()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def measure(processes: int, chunks: int = 4, shapes=(), host_model=None) -> dict:
    """The figures of the module docstring, from `processes` (>= 2) processes started now; `shapes`: the (rows,
    in, out) linears to time (devices.compute_speeds)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(processes, os.path.join(d, "store"), d, max(chunks, 2 * processes),
                                            tuple(shapes), host_model),
                           nprocs=processes, join=True, start_method="spawn")
        ranks = [json.load(open(os.path.join(d, f"{r}.json"))) for r in range(processes)]
    latency = ranks[0]["oneway_4"]
    extra = max(ranks[0][f"oneway_{LARGE}"] - latency, 1e-9)
    out = {"flops": min(r["flops"] for r in ranks), "hbm": min(r["hbm"] for r in ranks),
           "op_s": max(r["op_s"] for r in ranks), "p2p_latency_s": latency, "p2p_bytes_s": LARGE / extra,
           "action_s": 0.0, "allreduce_s": max(r["allreduce_s"] for r in ranks),
           "flops_spread": max(r["flops_spread"] for r in ranks),
           "gemm_table": tuple((tuple(entry[0]), *(max(r["gemm_table"][i][j] for r in ranks) for j in (1, 2, 3)))
                               for i, entry in enumerate(ranks[0]["gemm_table"])),
           "layer_op_s": tuple(max(r["layer_op_s"][j] for r in ranks) for j in range(3))
           if all(r["layer_op_s"] for r in ranks) else (),
           "logit_s": tuple(max(r["logit_s"][j] for r in ranks) for j in range(2))
           if all(r["logit_s"] for r in ranks) else (),
           "zero_s": max(r["zero_s"] for r in ranks)}
    if processes % 2 == 0:
        step = max(r["pipeline_step_s"] for r in ranks)
        out["pipeline_step_s"] = step
        out["action_s"] = action_overhead(step, processes, max(chunks, 2 * processes), latency)
    return out
