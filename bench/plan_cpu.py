"""The planner against a measured run: `make train`'s configuration on this machine's CPU.

    .venv/bin/python -m bench.plan_cpu [--steps N]

Plans the configured layout with cluster.gpu=cpu (speeds measured now), runs
`torchrun --standalone --nproc-per-node=2 -m launch.train parallel=dualpipe`, plans again (the machine may be
shared: the two plans bracket the run), and prints the predicted and measured step time (median over the steps
after the first 10) and peak RSS of the largest process, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _plan(overrides):
    """The configured layout's plan, with the cpu's speeds measured now."""
    from framework.plan.estimate import GiB
    from framework.plan.run import make_plans
    from launch.train import check_overrides

    plans, _, dev = make_plans(check_overrides(overrides), search=False)
    p = plans[0]
    return {"step_s": p.step_s, "rss_gib": p.memory.total / GiB, "runtime_gib": p.memory.runtime / GiB,
            "model_gib": (p.memory.total - p.memory.runtime) / GiB, "gflops": dev.bf16_flops / 1e9,
            "op_us": dev.op_overhead_s * 1e6, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    overrides = ["parallel=dualpipe", f"train.steps={args.steps}"]
    before = _plan(overrides)
    run_id = f"plan-check-{int(time.time())}"
    load0 = os.getloadavg()[0]
    cmd = [str(ROOT / ".venv/bin/torchrun"), "--standalone", "--nproc-per-node=2", "-m", "launch.train", *overrides,
           "logging.console=none"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "DUET_RUN_ID": run_id})
    load1 = os.getloadavg()[0]
    after = _plan(overrides)
    rows = [json.loads(line) for line in open(ROOT / "outputs" / run_id / "metrics.jsonl")]
    steps = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 10]
    rss = max(r["mem/rss_peak_gb"] for r in rows if "mem/rss_peak_gb" in r)
    measured = statistics.median(steps)
    print(f"| | step time s | peak RSS GiB (model + runtime) | matmul GFLOP/s | op us | load |")
    print(f"|---|---|---|---|---|---|")
    mean = {k: (before[k] + after[k]) / 2 for k in before}
    for name, p in (("plan before", before), ("plan after", after), ("plan, mean of the two", mean)):
        print(f"| {name} | {p['step_s']:.3f} ({p['step_s'] / measured - 1:+.0%}) | {p['rss_gib']:.3f} "
              f"({p['rss_gib'] / rss - 1:+.0%}; {p['model_gib']:.3f} + {p['runtime_gib']:.3f}) | "
              f"{p['gflops']:.1f} | {p['op_us']:.1f} | {p['load']:.1f} |")
    print(f"| measured ({run_id}) | {measured:.3f} (median of {len(steps)}) | {rss:.3f} | | | "
          f"{load0:.1f} -> {load1:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
