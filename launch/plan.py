"""Plan a run before booking a cluster: which layout fits, how fast it goes, what it costs.

  python -m launch.plan model=deepseek_v3_671b cluster=v3_h800 train.seq_len=4096 train.global_batch_size=15360 \
      train.dtype=bfloat16 fp8=blockwise fp8.dispatch=true optim.zero=true optim.state.exp_avg=bf16 \
      optim.state.exp_avg_sq=bf16
  python -m launch.plan parallel=dualpipe                   # make train's run on this machine (cluster.gpu=cpu)

The same Hydra schema as launch.train, plus the `cluster` group (framework/config.py). Prints the ranked layouts
(framework/plan/), marks the one the configuration asks for, and writes to cluster.out_dir: plan.md (the table and
the assumptions), gantt.png (the chosen layout's simulated step) and train_plan.yaml, a config for
    python -m launch.train --config-dir <cluster.out_dir> --config-name train_plan
Exit status 2 for bad input, in one line naming the key.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from launch.train import _one_line, check_overrides


def compose(argv: list[str]):
    try:
        return check_overrides(argv)
    except Exception as e:  # Hydra / OmegaConf composition errors: one line naming the key
        raise SystemExit(_fail(_one_line(e)))


def _fail(message: str) -> int:
    print(f"config error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = compose(argv)
    from framework.config import ConfigError, validate_model
    from framework.plan.run import plan_from_config, validate_cluster

    try:
        validate_model(cfg.model)
        validate_cluster(cfg)
    except ConfigError as e:
        return _fail(str(e))
    try:
        report = plan_from_config(cfg)
    except ConfigError as e:
        return _fail(str(e))
    print(report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
