"""FP8 health per training step, summarized for the metrics sink (saturation and underflow are reported, never silent).

Every FP8 GEMM site (an Fp8Linear, or one projection of FP8 experts) counts, for each quantized role (x: inputs,
w: weights, dy: output gradients), the largest |value| and the elements that saturated or underflowed (see
linear.QuantStats). A per-layer dump of those is hundreds of keys and one device sync per value; here every
counter is stacked into one tensor and read with ONE synchronization, then summarized over layers per role:

  fp8/<role>_amax                largest |value| over all layers
  fp8/<role>_saturated_frac      saturated elements / quantized elements, pooled over layers (0 with online
                                 per-tile scaling, V3 §3.3: it flags stale or external scales)
  fp8/<role>_underflow_frac      nonzeros flushed to 0 / quantized elements, pooled over layers
  fp8/<role>_underflow_frac_max  the same fraction in the worst layer (a single layer going bad is visible)
  fp8/sites                      number of FP8 GEMM sites that reported

Only steps taken with gradients count (validation passes are not recorded), and the counters are reset after
each read, so each call describes the steps since the previous one.
"""
from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import nn

from .linear import iter_fp8_stats

ROLES = ("x", "w", "dy")


def fp8_metrics(model: Union[nn.Module, Iterable[nn.Module]], reset: bool = True) -> dict[str, float]:
    """Per-role summary of the FP8 statistics of `model` (a module or the list of this rank's modules).

    Returns {} when the model has no FP8 GEMM or none ran since the last reset.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(f"model must be an nn.Module or a list of them, got {type(model).__name__}")
    sites = [stats for m in models for _, stats in iter_fp8_stats(m)]
    rows, meta = [], []  # one row [amax, saturated, underflow] per (site, role) that saw data
    for i, stats in enumerate(sites):
        for role in ROLES:
            rs = getattr(stats, role)
            if rs.total:
                rows.append(torch.stack([rs.amax.double(), rs.saturated.double(), rs.underflow.double()]))
                meta.append((role, rs.total))
        if reset:
            stats.reset()
    if not rows:
        return {}
    device = rows[0].device
    values = torch.stack([r.to(device) for r in rows]).tolist()  # the one host synchronization
    out: dict[str, float] = {"fp8/sites": float(len(sites))}
    for role in ROLES:
        mine = [(v, total) for v, (r, total) in zip(values, meta) if r == role]
        if not mine:
            continue
        total = sum(t for _, t in mine)
        out[f"fp8/{role}_amax"] = max(v[0] for v, _ in mine)
        out[f"fp8/{role}_saturated_frac"] = sum(v[1] for v, _ in mine) / total
        out[f"fp8/{role}_underflow_frac"] = sum(v[2] for v, _ in mine) / total
        out[f"fp8/{role}_underflow_frac_max"] = max(v[2] / t for v, t in mine)
    return out
