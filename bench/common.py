"""Shared pieces of the benchmarks: compose a config like the CLI does, train in this process, write a report."""
from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"


def compose(*overrides: str):
    from launch.train import check_overrides

    return check_overrides(list(overrides))


def train_in_process(out_dir: Path, *overrides: str):
    """One-process training run (no torchrun): returns (trainer, history)."""
    from framework.config import validate
    from framework.trainer import Trainer
    from parallel.mesh import init_mesh

    cfg = compose("logging.console=none", "logging.wandb.mode=disabled", "train.checkpoint_interval=0", *overrides)
    cfg.train.output_dir = str(out_dir)
    cfg.train.resume = "none"
    validate(cfg, 1)
    trainer = Trainer(cfg, init_mesh(1, 1, 1, "cpu"))
    trainer.save_checkpoint = lambda: None  # benchmarks measure training, not I/O
    return trainer, trainer.fit()


def mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}")


def write_report(name: str, text: str) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    print(text)
    return path
