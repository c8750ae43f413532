"""One metrics API, several sinks: a JSONL file (always), the console, and Weights & Biases (rank 0).

Sinks never stop training: a sink that raises is reported once and switched off.

After a restart the steps between the checkpoint and the crash run again. metrics.jsonl is truncated on resume to the
rows up to the checkpoint's step, so every step appears once and the replayed values are the ones kept. W&B cannot
rewind a run: it ignores a step lower than one it has seen, so it keeps the values from before the crash (equal to
the replayed ones: the resume is exact, only timings differ).
Secrets never reach a log: values of environment variables such as WANDB_API_KEY are masked in every config that is
written or uploaded (`redact`).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# environment variables whose values must never be written anywhere
SECRET_ENV = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


def secret_values() -> dict[str, str]:
    """{value: variable name} of the secrets in this process's environment (values of 6+ characters)."""
    return {v: k for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 6}


def redact(obj: Any, secrets: dict[str, str] | None = None) -> Any:
    """A copy of a plain config (dicts, lists, strings) with every secret value replaced by '<NAME redacted>'."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    if isinstance(obj, str):
        for value, name in secrets.items():
            obj = obj.replace(value, f"<{name} redacted>")
    return obj


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows with step <= last_step (all of them gone when last_step is 0: a fresh run). Returns rows kept."""
    if not path.is_file():
        return 0
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:               # a line cut short by a crash
            continue
        if last_step > 0 and row.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
    return len(keep)


class JsonlSink:
    def __init__(self, path: Path, start_step: int = 0):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            truncate_jsonl(path, start_step)      # drop what a restart will replay
            self.f = open(path, "a", buffering=1)
        except OSError as e:                      # bad input (a read-only folder, a directory in the way): one line
            raise ValueError(f"{path}: cannot write the metrics file ({e.strerror or type(e).__name__}); make it "
                             f"writable or choose another train.output_dir") from None

    def log(self, step: int, metrics: dict) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def close(self) -> None:
        self.f.close()


class ConsoleSink:
    """A rich progress bar with ETA on a TTY; plain lines otherwise (logs, CI)."""

    KEYS = ("loss", "val/loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s")

    def __init__(self, mode: str, total_steps: int, start_step: int, interval: int):
        self.interval, self.total = interval, total_steps
        self.rich = mode == "rich" or (mode == "auto" and sys.stdout.isatty())
        self.progress = None
        if self.rich:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)
            self.progress.start()

    def _text(self, metrics: dict) -> str:
        parts = []
        for k in self.KEYS:
            if k in metrics and isinstance(metrics[k], (int, float)):
                v = metrics[k]
                parts.append(f"{k} {v:.3e}" if k == "lr" else f"{k} {v:.4g}")
        return " | ".join(parts)

    def log(self, step: int, metrics: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=self._text(metrics))
        elif step % self.interval == 0 or step == self.total or "val/loss" in metrics:
            print(f"step {step}/{self.total} | {self._text(metrics)}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class WandbSink:
    """Offline by default; online only when asked for and WANDB_API_KEY is set. The API key never enters the config."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume_id: str | None = None):
        mode = cfg.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("wandb: logging.wandb.mode=online but WANDB_API_KEY is not set; logging offline", flush=True)
            mode = "offline"
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name, mode=mode,
                              dir=str(run_dir), config=config, id=resume_id, resume="allow" if resume_id else None,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_image(self, step: int, key: str, path: str) -> None:
        self.run.log({key: self.wandb.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


class Metrics:
    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            fn = getattr(sink, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as e:  # a dashboard must never stop training
                print(f"metrics: {type(sink).__name__}.{method} failed ({type(e).__name__}: {e}); sink disabled",
                      file=sys.stderr, flush=True)
                self.sinks.remove(sink)

    def log(self, step: int, metrics: dict) -> None:
        self._each("log", step, {k: _plain(v) for k, v in metrics.items()})

    def log_image(self, step: int, key: str, path: str) -> None:
        self._each("log_image", step, key, path)

    def close(self) -> None:
        self._each("close")


def build_metrics(cfg, run_dir: Path, rank: int, total_steps: int, start_step: int, config: dict) -> Metrics:
    """Rank 0 gets every sink; other ranks log nothing (their numbers are reduced to rank 0 first)."""
    if rank != 0:
        return Metrics([])
    sinks: list = [JsonlSink(run_dir / "metrics.jsonl", start_step)]
    config = redact(config)
    if cfg.console != "none":
        sinks.append(ConsoleSink(cfg.console, total_steps, start_step, cfg.log_interval))
    if cfg.wandb.mode != "disabled":
        try:
            id_file = run_dir / "wandb_run_id"
            resume_id = id_file.read_text().strip() if id_file.exists() else None
            sink = WandbSink(cfg.wandb, run_dir, config, resume_id)
            id_file.write_text(sink.run.id)
            sinks.append(sink)
        except Exception as e:
            print(f"wandb: could not start ({type(e).__name__}: {e}); continuing without it", file=sys.stderr, flush=True)
    return Metrics(sinks)
