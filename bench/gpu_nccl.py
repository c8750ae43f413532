"""GPU-only check of the communication stream's SM budget (parallel/comm.py), for `bash bench/gpu.sh`.

One GPU cannot host two NCCL ranks, so this builds a world-size-1 NCCL process group, then an expert-parallel group
through parallel.comm.new_ep_group with sm_budget=20, and checks that NCCL accepted the CTA limits (the options the
group reports) and that a collective on the high-priority communication stream (CommStream) completes. Prints a table.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        print("gpu_nccl: needs CUDA and a torch build with NCCL", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from parallel.comm import CommStream, new_ep_group, nccl_options

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=timedelta(seconds=60), device_id=dev)
    rows, ok = [], True
    opts = nccl_options(20)
    rows.append(("options built", f"max_ctas={opts.config.max_ctas} min_ctas={opts.config.min_ctas} "
                                  f"high_priority={opts.is_high_priority_stream}"))
    ok &= opts.config.max_ctas == 20 and opts.config.min_ctas == 20
    group = new_ep_group([0], backend="nccl", sm_budget=20)
    reported = getattr(group, "options", None) or getattr(group._get_backend(dev), "options", None)
    seen = getattr(getattr(reported, "config", None), "max_ctas", "n/a")
    rows.append(("group reports max_ctas", str(seen)))
    x = torch.ones(1 << 20, device=dev)
    stream = CommStream(dev)
    with stream.launch():
        work = dist.all_reduce(x, group=group, async_op=True)
    work.wait()
    torch.cuda.synchronize()
    rows.append(("all_reduce on the comm stream", "ok" if bool((x == 1).all()) else "WRONG"))
    ok &= bool((x == 1).all())
    print("| NCCL SM budget check | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
