"""Training loss with compact optimizer states: fp32 vs bf16 vs fp8 moments on deepseek_v3_tiny.

  python -m bench.optim_loss [--steps 300]

Identical data, seed and model; one process. Reports the final validation loss and the mean training loss over the
last 10% of steps for each format, the relative gap to fp32 moments (target <= 0.25%, V3's bound for FP8 training),
and the measured bytes/parameter of each moment and the optimizer step time ratio from the manager's memory report.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import machine, train_in_process, write_report

FORMATS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "fp8": ("fp8", "fp8")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = ap.parse_args()
    if "fp32" not in args.formats:
        args.formats.insert(0, "fp32")  # the reference every gap is measured against
    rows = {}
    for name in args.formats:
        m, v = FORMATS[name]
        with tempfile.TemporaryDirectory() as d:
            trainer, hist = train_in_process(Path(d), "model=deepseek_v3_tiny", f"train.steps={args.steps}",
                                             f"train.eval_interval={args.steps}", "train.micro_batches=2",
                                             f"optim.state.exp_avg={m}", f"optim.state.exp_avg_sq={v}")
        losses = [h["loss"] for h in hist if "loss" in h]
        tail = losses[-max(1, len(losses) // 10):]
        report = trainer.optimizer.memory_report()
        t0 = time.perf_counter()
        for _ in range(5):  # optimizer step time on the trained model's state (gradients left from a last step)
            trainer.optimizer.step()
        step_ms = (time.perf_counter() - t0) / 5 * 1e3
        rows[name] = (hist[-1]["val/loss"], sum(tail) / len(tail), report, step_ms)
    base_val, base_tail = rows["fp32"][0], rows["fp32"][1]
    lines = [f"### Optimizer-state formats on deepseek_v3_tiny ({args.steps} steps)", "",
             f"Command: `python -m bench.optim_loss --steps {args.steps} --formats {' '.join(args.formats)}`; {machine()}.", "",
             "| moments | val loss | gap vs fp32 | train loss, last 10% | gap vs fp32 | bytes/param (exp_avg + exp_avg_sq) | optimizer step (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name, (val, tail, rep, ms) in rows.items():
        per = rep.get("bytes_per_param", rep)
        moments = per.get("exp_avg", float("nan")) + per.get("exp_avg_sq", float("nan"))
        lines.append(f"| {name} | {val:.4f} | {(val - base_val) / base_val:+.2%} | {tail:.4f} | "
                     f"{(tail - base_tail) / base_tail:+.2%} | {moments:.3f} | {ms:.1f} |")
    write_report("optim_loss", "\n".join(lines))


if __name__ == "__main__":
    main()
