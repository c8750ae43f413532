"""Learning-rate schedules as multipliers of the peak lr (for torch.optim.lr_scheduler.LambdaLR)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, total: int, schedule: str, warmup: int, min_ratio: float, decay_fraction: float) -> float:
    """Multiplier at optimizer step `step` (0-based): linear warmup to 1, then
    cosine: cosine decay to min_ratio at the last step;
    wsd (warmup-stable-decay, MiniCPM arXiv 2404.06395): flat, then linear decay to min_ratio over the last
    decay_fraction of the steps; constant: flat."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total - 1 - warmup)
        t = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = max(1, round(total * decay_fraction))
        start = total - decay_steps
        if step < start:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min(1.0, (step - start + 1) / decay_steps)
    raise ValueError(f"optim.schedule={schedule!r}: allowed cosine, wsd, constant")


def make_scheduler(optimizer, total: int, schedule: str, warmup: int, min_ratio: float, decay_fraction: float):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total, schedule, warmup, min_ratio, decay_fraction))
