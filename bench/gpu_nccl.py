"""The NCCL SM budget of the expert-parallel group, read back from the communicator, for `bash bench/gpu.sh`.

One GPU cannot host two NCCL ranks, so this builds world-size-1 NCCL groups through parallel.mesh.new_ep_group with
two budgets and reads what the communicator did with them from NCCL's own log (NCCL_DEBUG=INFO, INIT): the number of
channels it opened (one CTA each). The check passes when the budgeted group opened at most `sm_budget` channels and a
collective on it completes; the unbudgeted default is shown next to it. Reading back the options object we just built
would only echo our own input, so it is not used as evidence. Not yet run on a GPU: the log format is NCCL's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 20


def child(budget: int) -> None:
    """Runs with NCCL_DEBUG=INFO: one group with `budget` (0 = NCCL's default), one all_reduce on it."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from parallel.mesh import new_ep_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29533"))
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    group = new_ep_group([0], backend="nccl", sm_budget=budget) if budget else dist.new_group([0], backend="nccl")
    x = torch.ones(1 << 20, device=dev)
    dist.all_reduce(x, group=group)
    torch.cuda.synchronize()
    print(f"ALLREDUCE_OK={bool((x == 1).all())}", flush=True)
    dist.destroy_process_group()


def channels(log: str) -> int | None:
    """Channels NCCL opened, from its INIT log: 'Channel 03/20 :' lines or 'N coll channels'."""
    found = [int(m) for m in re.findall(r"Channel \d+/(\d+)", log)]
    found += [int(m) for m in re.findall(r"(\d+) coll channels", log)]
    return max(found) if found else None


def run(budget: int, port: int) -> tuple[int | None, bool, str]:
    env = dict(os.environ, NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT", PORT=str(port))
    proc = subprocess.run([sys.executable, __file__, "--child", str(budget)], env=env, capture_output=True,
                          text=True, timeout=120)
    log = proc.stdout + proc.stderr
    return channels(log), "ALLREDUCE_OK=True" in log, log.strip().splitlines()[-1] if log.strip() else ""


def main() -> int:
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        print("gpu_nccl: needs CUDA and a torch build with NCCL", file=sys.stderr)
        return 2
    default_ch, default_ok, last0 = run(0, 29533)
    budget_ch, budget_ok, last1 = run(BUDGET, 29534)
    ok = budget_ok and budget_ch is not None and budget_ch <= BUDGET
    print("| NCCL communicator (world size 1, one GPU) | channels opened (CTAs) | all_reduce |")
    print("|---|---|---|")
    print(f"| default | {default_ch if default_ch is not None else 'not in the log: ' + last0} | "
          f"{'ok' if default_ok else 'FAILED'} |")
    print(f"| new_ep_group(sm_budget={BUDGET}) | {budget_ch if budget_ch is not None else 'not in the log: ' + last1} | "
          f"{'ok' if budget_ok else 'FAILED'} |")
    print(f"\nSM budget honoured (channels <= {BUDGET}): **{'yes' if ok else 'NO'}**")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]))
    else:
        sys.exit(main())
