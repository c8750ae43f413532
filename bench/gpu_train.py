"""deepseek_v3_small training steps on one CUDA GPU, FP8 on and off, for `bash bench/gpu.sh`.

Runs `launch.train` (the user's entry point) twice in child processes on the same data and reads their metrics.jsonl:
tokens/s (median over the steps after warm-up), MFU against the GPU's spec-sheet dense bf16 peak (the trainer's own
`mfu` uses a measured matmul peak; both are shown), and peak CUDA memory. Prints a markdown table; exit 1 if a run
fails. `--smoke` runs deepseek_v3_tiny for 3 steps on CPU to check the script itself (its numbers mean nothing).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (H100/H200 SXM: 989 TFLOP/s;
# A100 SXM: 312 TFLOP/s; H800 SXM as H100); FP8 is twice bf16 on Hopper
SPEC_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12}


def spec_peak(name: str) -> float | None:
    return next((v for k, v in SPEC_BF16.items() if k in name.upper()), None)


def run(tag: str, overrides: list[str], workdir: Path, smoke: bool) -> dict:
    out = workdir / tag
    cmd = [sys.executable, "-m", "launch.train", *overrides, f"hydra.run.dir={out}", "logging.wandb.mode=disabled",
           "train.eval_interval=1000000", "train.checkpoint_interval=1000000"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=70,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        return {"tag": tag, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "tokens_per_s" in r]
    steady = steps[len(steps) // 3:] or steps        # the first third is warm-up (allocator, autotuning)
    mem = [r[k] for r in rows for k in ("mem/cuda_max_allocated_gb", "mem/rss_peak_gb") if k in r]
    return {"tag": tag, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "mfu_measured_peak": statistics.median(r["mfu"] for r in steady),
            "step_s": statistics.median(r["step_time_s"] for r in steady), "peak_gb": max(mem) if mem else float("nan"),
            "steps": len(steps), "final_loss": steps[-1]["loss"]}


def main() -> int:
    smoke = "--smoke" in sys.argv[1:]
    import torch

    if not smoke and not torch.cuda.is_available():
        print("gpu_train: needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    base = (["model=deepseek_v3_tiny", "train.steps=3", "train.device=cpu"] if smoke else
            ["model=deepseek_v3_small", "train.steps=30", "train.device=cuda", "train.dtype=bfloat16",
             "train.seq_len=1024", "train.global_batch_size=16", "train.micro_batches=4"])
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run("bf16", base + ["fp8=disabled"], Path(tmp), smoke),
                run("fp8", base + ["fp8=blockwise"], Path(tmp), smoke)]
    model = "deepseek_v3_tiny (smoke)" if smoke else "deepseek_v3_small"
    print(f"| {model} on {gpu} | tokens/s | step s | MFU (spec bf16 peak) | MFU (measured peak) | peak GB | final loss |")
    print("|---|---|---|---|---|---|---|")
    fpt = flops_per_token(base)
    peak = spec_peak(gpu)
    ok = True
    for r in runs:
        if "error" in r:
            ok = False
            print(f"| {r['tag']} | FAILED: {' '.join(r['error'])} | | | | | |")
            continue
        spec_mfu = f"{fpt * r['tokens_per_s'] / peak:.1%}" if peak else "n/a (no spec sheet)"
        print(f"| {r['tag']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {spec_mfu} | "
              f"{r['mfu_measured_peak']:.1%} | {r['peak_gb']:.2f} | {r['final_loss']:.3f} |")
    if ok and all("error" not in r for r in runs):
        speedup = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
        print(f"\nfp8 / bf16 tokens/s: **{speedup:.2f}x** (goal >= 1.3x on H100/H200-class GPUs)")
    return 0 if ok else 1


def flops_per_token(overrides: list[str]) -> float:
    """Training FLOPs per token of the configured model (activated parameters and attention), built on meta."""
    import torch
    from hydra import compose, initialize_config_dir

    from framework.config import register_configs
    from framework.models import build_model

    register_configs()
    keep = [o for o in overrides if o.startswith(("model=", "train.seq_len"))]
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=keep)
    with torch.device("meta"):
        model = build_model(cfg.model)
    return model.flops_per_token(cfg.train.seq_len)


if __name__ == "__main__":
    sys.exit(main())
