"""MoE layer throughput, one process (ep=1) vs expert parallelism over 2 processes (ep=2), on CPU.

Each process uses 1 thread; every configuration processes the same global tokens per step (ep=2: half per rank).
One step = forward + backward of one MoE layer (router, dispatch, grouped-GEMM experts, combine, shared expert).
The configurations are measured in interleaved rounds (one step of each per round, ep=1 on rank 0 while rank 1
waits), so the machine's load drifts over all of them alike; a step of ep=2 ends when its slower rank ends.
The all-to-all share comes from the exchange traces (parallel/exchanges.py): "all-to-all" sums the exchanges' durations
(start to completion), "exposed" sums the time the layer sat in wait(); both per step, averaged over the ranks.

    python -m bench.moe_ep [--tokens 4096 --hidden 256 ...]

Rows with an emulated link say so: every exchange then lasts at least latency + bytes / bandwidth (gigabits/s), which
is how a CPU run shows what a real interconnect would cost; without it, gloo moves data through local memory.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from bench.common import machine, write_report
from parallel.mesh import free_port


def moe_config(a):
    from framework.config import ModelConfig

    return ModelConfig(name="deepseek_v3", vocab_size=64, hidden_size=a.hidden, moe_intermediate_size=a.inter,
                       n_routed_experts=a.experts, num_experts_per_tok=a.topk, n_shared_experts=1)


def build_layer(a):
    from framework.models.deepseek_v3.moe import MoE

    torch.manual_seed(0)
    layer = MoE(moe_config(a))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02)
    return layer


def one_step(layer, x, gy) -> float:
    """Seconds of one forward+backward."""
    t0 = time.perf_counter()
    xi = x.detach().requires_grad_()            # as if produced by the previous layer
    (layer(xi) * gy).sum().backward()
    layer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def _worker(rank: int, port: int, a, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import logging

    import torch.distributed as dist

    from parallel import exchanges
    from framework.models.expert_parallel import apply_expert_parallel
    from parallel.mesh import init_mesh

    logging.getLogger("parallel.mesh").setLevel(logging.ERROR)
    mesh = init_mesh(1, 2, 2, device="cpu", backend="gloo")
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(1, a.tokens, a.hidden, generator=g)
    gy_all = torch.randn(1, a.tokens, a.hidden, generator=g)
    half = a.tokens // 2
    x, gy = x_all[:, rank * half:(rank + 1) * half], gy_all[:, rank * half:(rank + 1) * half]

    # (name, fp8 dispatch, link); None marks the one-process baseline
    variants = [("ep=1 (local dispatch)", None, None), ("ep=2", False, None), ("ep=2, FP8 dispatch", True, None)]
    for spec in a.links:
        lat, gbps = (float(v) for v in spec.split(","))
        variants.append(("ep=2, emulated link", False, exchanges.EmulatedLink(lat, gbps)))
    layers, recorders = [], []
    for name, fp8, link in variants:
        recorders.append(exchanges.CommRecorder())
        if fp8 is None:
            layers.append(build_layer(a))
        else:
            layers.append(apply_expert_parallel(build_layer(a), mesh, fp8_dispatch=fp8, link=link,
                                                recorder=recorders[-1]))
    times = [[] for _ in variants]
    for i in range(a.warmup + a.steps):
        for v, (name, fp8, link) in enumerate(variants):
            if i == a.warmup:
                recorders[v].clear()
            dist.barrier()
            if fp8 is None:
                t = one_step(layers[v], x_all, gy_all) if rank == 0 else 0.0
            else:
                t = one_step(layers[v], x, gy)
            if i >= a.warmup:
                times[v].append(t)
    rows = []
    for v, (name, fp8, link) in enumerate(variants):
        steps = torch.tensor(times[v], dtype=torch.float64)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)                     # a step ends when the slower rank ends
        mine = torch.tensor([sum(times[v]), sum(r.duration for r in recorders[v].resolved()),
                             sum(r.waited for r in recorders[v].resolved())], dtype=torch.float64)
        dist.all_reduce(mine)                                             # ratios averaged over the two ranks
        row_bytes = a.hidden + 4 * math.ceil(a.hidden / 128) if fp8 else 4 * a.hidden
        rows.append(dict(config=name, ranks="1 x 1" if fp8 is None else "2 x 1",
                         step_s=float(steps.median()), comm=float(mine[1] / mine[0]),
                         exposed=float(mine[2] / mine[0]),
                         link="-" if link is None else f"{link.latency_us:g} us, {link.gbps:g} Gb/s",
                         payload="-" if fp8 is None else f"{row_bytes} B/row" + (" (e4m3 + scales)" if fp8 else
                                                                                    " (fp32)")))
    if rank == 0:
        torch.save(rows, os.path.join(outdir, "rows.pt"))
    dist.destroy_process_group()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=128, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--links", nargs="*", default=["5,400", "50,10"],
                   help="emulated links to add as rows, each 'latency_us,gbps' (gigabits/s)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.tokens % 2:
        raise ValueError(f"--tokens={a.tokens}: must be even (split over 2 ranks)")
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(free_port(), a, outdir), nprocs=2, join=True)
        rows = torch.load(os.path.join(outdir, "rows.pt"))
    head = (f"MoE layer forward+backward, CPU, {a.tokens} global tokens/step, hidden {a.hidden}, {a.experts} experts "
            f"(intermediate {a.inter}), top-{a.topk}, 1 shared expert, fp32, median of {a.steps} interleaved steps\n\n")
    table = ["| config | processes x threads | ms / step | tokens / s | all-to-all % of layer | exposed % | "
             "emulated link | dispatch payload |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['config']} | {r['ranks']} | {1e3 * r['step_s']:.1f} | {a.tokens / r['step_s']:,.0f} | "
                     f"{100 * r['comm']:.1f} | {100 * r['exposed']:.1f} | {r['link']} | {r['payload']} |")
    fp8_row = a.hidden + 4 * math.ceil(a.hidden / 128)
    notes = ("\n\nall-to-all % = exchange time (start to completion: counts + dispatch + combine, forward and "
             "backward) / step time, averaged over the ranks; exposed % = time blocked in wait(). This layer waits "
             "right after starting, so exposed ~ all-to-all (plus thread wake-up); on CPU most of it is waiting for "
             "the slower peer. The FP8 row pays for quantizing in plain torch on CPU; its payload is "
             f"{4 * a.hidden / fp8_row:.1f}x smaller than fp32 rows ({2 * a.hidden / fp8_row:.1f}x than bf16). "
             "Emulated-link rows add latency + bytes/bandwidth to every exchange (parallel/exchanges.py EmulatedLink).")
    command = "python -m bench.moe_ep" + ("" if argv is None else " " + " ".join(argv))
    text = (f"## MoE layer: expert parallelism on CPU (bench/moe_ep.py)\n\n{head}" + "\n".join(table) + notes
            + f"\n\nCommand: `{command}`; machine: {machine()} per process.\n")
    write_report("moe_ep", text)
    return text


if __name__ == "__main__":
    main()
