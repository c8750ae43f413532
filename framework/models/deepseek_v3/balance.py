"""Expert load balancing: the auxiliary-loss-free bias rule (V3 §2.1.2, arXiv 2408.15664) and its metrics.

Every Router counts the tokens it sends to each expert into `router.load`, in training forwards only. After a step
the trainer reads the counts of its own layers (`expert_loads`), sums them over all data-parallel ranks, and calls
`update_biases`: b_i += u * sign(mean(c) - c_i), so overloaded experts become less attractive for the top-k choice
only (gate weights never see b). u = 1e-3 in V3, 0 for the last 500B tokens (`bias_update_rate`). Evaluation counts
its own loads apart (`tally_loads`, for MaxVio_global), so the training counts need no saving around it.

All functions walk `module.modules()`, so they work on a whole model or on one pipeline stage; the layer order is
module order (main layers first, then MTP layers).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from framework.models.deepseek_v3.moe import MoE, Router


def routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def expert_loads(model: nn.Module) -> torch.Tensor:
    """[L_moe, E] int64: tokens routed to each expert since the last reset (this process only)."""
    rs = routers(model)
    if not rs:
        return torch.zeros(0, 0, dtype=torch.int64)
    return torch.stack([r.load for r in rs])


@torch.no_grad()
def reset_loads(model: nn.Module) -> None:
    for r in routers(model):
        r.load.zero_()


@contextmanager
def tally_loads(models: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Count the expert loads of every forward run inside the block, in any mode (the training counts stay as they
    are). Yields a list that holds, once the block ends, the [L_moe, E] int64 counts of each model (this process)."""
    rs = [routers(m) for m in models]
    for r in (r for group in rs for r in group):
        r.tally = torch.zeros_like(r.load)
    out: list[torch.Tensor] = []
    try:
        yield out
        out += [torch.stack([r.tally for r in group]) if group else torch.zeros(0, 0, dtype=torch.int64)
                for group in rs]
    finally:
        for r in (r for group in rs for r in group):
            r.tally = None


@torch.no_grad()
def update_biases(model: nn.Module, loads: torch.Tensor, rate: float) -> None:
    """b += rate * sign(mean(load) - load) per MoE layer; `loads` [L_moe, E] already summed over all ranks."""
    rs = routers(model)
    if loads.shape[0] != len(rs):
        raise ValueError(f"loads has {loads.shape[0]} rows: the model has {len(rs)} MoE layers")
    for r, load in zip(rs, loads):
        load = load.to(r.e_score_correction_bias.device, torch.float32)
        r.e_score_correction_bias += rate * torch.sign(load.mean() - load)


def bias_update_rate(cfg, step: int, steps: int) -> float:
    """u after optimizer step `step` of `steps`: model.bias_update_rate, 0 from model.bias_update_stop_fraction on."""
    return cfg.bias_update_rate if step < cfg.bias_update_stop_fraction * steps else 0.0


def collect_aux_loss(module: nn.Module) -> Optional[torch.Tensor]:
    """Sum and clear the balance losses left by the MoE layers of `module` during their last forward.

    final() calls it on the whole model; a pipeline stage without final() calls it on its own layers right after
    its forward and adds the result to what it back-propagates.
    """
    total = None
    for m in module.modules():
        loss = m.take_balance_loss() if isinstance(m, MoE) else None
        if loss is not None:
            total = loss if total is None else total + loss
    return total
