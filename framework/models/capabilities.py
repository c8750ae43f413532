"""What the training loop asks of a model besides the outline of dense.py: asked by capability, never by model name.

  set_progress(fraction)                 training progress in [0, 1] (DeepSeek-V3: the MTP loss weight's switch)
  moe_layers()                           MoE layers whose experts are balanced; 0 and the next two are never called
  expert_loads()                         [moe_layers, experts] int64: tokens routed to each expert by this process
                                         since the last update
  update_balance(loads, step, steps)     the auxiliary-loss-free bias update (V3 §2.1.2) from `loads` summed over
                                         every rank, after optimizer step `step` of `steps`; the counts restart
  head_modules()                         {name: module} a pipeline's last part holds besides norm and lm_head
  head_reads_embedding()                 whether the last part reads the embedding (so it must share its rank)
  tally_loads()                          a context manager: the loads of the forwards run inside it (evaluation
                                         included), counted apart from the training counts; yields a list that
                                         holds the [moe_layers, experts] counts once the block ends

Every model of the registry implements it (the dense model trivially: no MoE layers), so dense and MoE models go
through the same trainer code.
"""
from __future__ import annotations

from typing import ContextManager, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainingCapabilities(Protocol):
    def set_progress(self, fraction: float) -> None: ...

    def moe_layers(self) -> int: ...

    def expert_loads(self) -> torch.Tensor: ...

    def update_balance(self, loads: torch.Tensor, step: int, steps: int) -> None: ...

    def head_modules(self) -> dict: ...

    def head_reads_embedding(self) -> bool: ...

    def tally_loads(self) -> ContextManager[list]: ...


def check_capabilities(model) -> None:
    """A model the trainer cannot drive fails here, naming what it lacks."""
    missing = [name for name in ("set_progress", "moe_layers", "expert_loads", "update_balance", "tally_loads",
                                 "head_modules", "head_reads_embedding")
               if not callable(getattr(model, name, None))]
    if missing:
        raise ValueError(f"model {type(model).__name__}: lacks {', '.join(missing)} "
                         f"(framework/models/capabilities.py lists what a trained model provides)")


def max_vio(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer = (max_i load_i - mean load) / mean load  (V3 §2.1.2 / arXiv 2408.15664). [L_moe, E] -> [L]."""
    loads = loads.float()
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, (loads.amax(dim=-1) - mean) / mean.clamp_min(1e-12), torch.zeros_like(mean))
