"""Auxiliary-loss-free balancing vs no balancing vs an auxiliary-loss baseline on deepseek_v3_tiny.

  python -m bench.balance [--steps 200]

Same data, seed and model; one process. Reports MaxVio_batch over training (mean of the last quarter of the steps),
MaxVio_global on the validation set at the end, and validation loss (the paper's shape, arXiv 2408.15664 Table 2:
loss-free is both better balanced and no worse in loss).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import OUT, machine, train_in_process, write_report

VARIANTS = {
    "loss-free bias (u=1e-3)": ["model.bias_update_rate=0.001", "model.aux_loss_alpha=0"],
    "no balancing": ["model.bias_update_rate=0", "model.aux_loss_alpha=0"],
    "aux loss (alpha=0.01)": ["model.bias_update_rate=0", "model.aux_loss_alpha=0.01"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    common = ["model=deepseek_v3_tiny", f"train.steps={args.steps}", f"train.eval_interval={args.steps}",
              "train.global_batch_size=16", "train.micro_batches=2"]
    rows, curves = [], {}
    for name, over in VARIANTS.items():
        with tempfile.TemporaryDirectory() as d:
            _, hist = train_in_process(Path(d), *common, *over)
        steps = [h for h in hist if "moe/maxvio_batch" in h]
        tail = steps[-max(1, len(steps) // 4):]
        curves[name] = [(h["step"], h["moe/maxvio_batch"]) for h in steps]
        end = hist[-1]
        rows.append((name, sum(h["moe/maxvio_batch"] for h in tail) / len(tail), end.get("val/maxvio_global", float("nan")),
                     end["val/loss"], end.get("loss/main", float("nan"))))
    png = OUT / "balance_maxvio.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(7, 3.5))
    for name, pts in curves.items():
        plt.plot([s for s, _ in pts], [v for _, v in pts], label=name, lw=1)
    plt.xlabel("step"); plt.ylabel("MaxVio_batch (mean over MoE layers)"); plt.yscale("log"); plt.legend()
    plt.tight_layout(); OUT.mkdir(exist_ok=True); plt.savefig(png, dpi=120); plt.close()
    lines = [f"### Expert balance on deepseek_v3_tiny ({args.steps} steps, 16 x 128 tokens per step)", "",
             f"Command: `python -m bench.balance --steps {args.steps}`; {machine()}. Curves: `bench/out/balance_maxvio.png`.", "",
             "| variant | MaxVio_batch (last 25% of steps) | MaxVio_global (validation) | val loss (main + 0.3 MTP) | train loss/main (last step) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {a:.3f} | {b:.3f} | {c:.4f} | {d:.4f} |" for n, a, b, c, d in rows]
    write_report("balance", "\n".join(lines))


if __name__ == "__main__":
    main()
