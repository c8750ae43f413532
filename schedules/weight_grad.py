"""B (input gradient, now) and W (weight gradient, later) for the pipeline schedules.

Every layer with trainable weights declares how its weight gradient is computed (framework/weight_grad.py): its
autograd Function hands a closure to `WeightGradStore` while the store is enabled, and the executor's W action runs
the closures of its chunk. Here: the switch applied to a pipeline part (plain nn.Linear and nn.Embedding become
their deferring subclasses in place) and the check that names the weights which would still get their gradient in B.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from framework.weight_grad import (SplitEmbedding, SplitLinear, SplitLinearFunction, WeightGradStore,
                                   run_weight_grads, split_linear, weight_grads)

__all__ = ["SplitEmbedding", "SplitLinear", "SplitLinearFunction", "WeightGradStore", "enable_weight_grad_split",
           "run_backward", "run_weight_grads", "split_linear", "undeferred_weights", "weight_grads"]


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backward from `tensors` seeded with `grad_tensors`, accumulating into leaves' .grad.

    Same contract as deepseek-ai/DualPipe's utility: the graph is freed, nothing is created for double backward,
    and tensors that do not reach a leaf are allowed.
    """
    if len(tensors) == 0:  # nothing of this chunk's outputs needs a gradient
        return
    torch.autograd.backward(tuple(tensors), tuple(grad_tensors))


_SWAPS = {nn.Linear: SplitLinear, nn.Embedding: SplitEmbedding}


def enable_weight_grad_split(module: nn.Module) -> int:
    """Turn every plain nn.Linear and nn.Embedding inside `module` (itself included) into its deferring subclass
    (SplitLinear, SplitEmbedding), in place.

    Only exact instances change (their class is swapped; parameters, buffers, hooks and state_dict keys stay as
    they are). Subclasses are left alone: they declare their own split (e.g. an FP8 linear). Returns how many
    layers were converted.
    """
    converted = 0
    for m in module.modules():
        swap = _SWAPS.get(type(m))
        if swap is not None:
            m.__class__ = swap
            converted += 1
    return converted


def undeferred_weights(module: nn.Module, among: Optional[Iterable[nn.Module]] = None) -> list[str]:
    """'name (Type)' of every module inside `module` (or only those of `among`, named as in `module`) that holds
    trainable parameters of its own and does not declare `defers_weight_grad`: their weight gradients are computed
    in B whatever the schedule asks."""
    keep = None if among is None else {id(m) for m in among}
    out = []
    for name, m in module.named_modules():
        if keep is not None and id(m) not in keep:
            continue
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own and not getattr(m, "defers_weight_grad", False):
            out.append(f"{name or '<root>'} ({type(m).__name__})")
    return out
