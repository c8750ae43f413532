"""Cut a framework model into pipeline parts.

Every model family has the outline embed -> layers -> final (norm, head, multi-token prediction, loss) (see
framework/models/dense.py). A part is a contiguous run of layers; the first part also embeds the tokens and the
last part ends with the model's `final`, returning the loss (scaled by `loss_scale`, so that the executor's
backward with gradient 1 yields the gradient of the mean over micro-batches).

Parts hold references to the model's own modules, so parameter names (and so checkpoints) are the model's, whatever
the pipeline layout. DualPipe places the first and last parts on the same ranks (rank r holds part r of one direction
and part PP-1-r of the other), which is how DeepSeek-V3 shares the embedding between the main model and the MTP
module physically (V3 §2.2): the last part reaches the embedding through the model without registering it, so each
parameter belongs to exactly one part and its two copies are summed once (schedules/mirror.py).

A part also offers its training forward as sub-stages (`forward_steps`, cut at the MoE all-to-alls) and the
deepseek-ai/DualPipe `overlapped_forward_backward` hook built on them, so the executor's F&B actions run one chunk's
exchanges under the other chunk's compute (schedules/overlap.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


class AttachLoss(torch.autograd.Function):
    """Return h unchanged; in backward, also seed `loss` with gradient `scale`. A pipeline stage can only hand its
    activation on, so a loss produced inside it (the MoE balance loss) rides on that activation's backward
    (Megatron-Core's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, h, loss, scale: float):
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        (loss,) = ctx.saved_tensors
        return grad_h, torch.full_like(loss, ctx.scale), None


def take_balance_losses(module: nn.Module) -> Optional[torch.Tensor]:
    """The sum of the losses the layers of `module` made in their last forward and not yet handed over (MoE balance
    losses), taken from them: a layer that makes one offers `take_balance_loss()`, returning it (or None) and
    clearing it. None if there is none."""
    total = None
    for m in module.modules():
        take = getattr(m, "take_balance_loss", None)
        loss = take() if callable(take) else None
        if loss is not None:
            total = loss if total is None else total + loss
    return total


class ModelPart(nn.Module):
    def __init__(self, model: nn.Module, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.start, self.stop = first, last, start, stop
        self._model = [model]                       # a list: not a submodule, its parameters stay unregistered here
        if first:
            self.embed = model.embed
        self.layers = nn.ModuleList(model.layers[start:stop])
        if last:
            self.norm, self.lm_head = model.norm, model.lm_head
            for name, module in model.head_modules().items():   # e.g. DeepSeek-V3's multi-token prediction
                setattr(self, name, module)
        self.loss_scale = 1.0
        self.metrics: list[dict] = []               # what final() reported, one dict per micro-batch
        # training forward as sub-stages (schedules/overlap.py): cut at the MoE all-to-alls so that an F&B pair can
        # run one chunk's exchanges under the other's compute (parallel.overlap), and/or with RMSNorm and SwiGLU
        # outputs recomputed in backward (parallel.recompute)
        self.overlap = True
        self.recompute = False

    def used_parameters(self) -> list[nn.Parameter]:
        """Parameters this part's backward writes: its own, plus the embedding the multi-token prediction of a
        last part reads through the model (registered by the first part)."""
        extra = []
        if self.last and not self.first and self._model[0].head_reads_embedding():
            extra = list(self._model[0].embed.parameters())
        return list(self.parameters()) + extra

    def uses_steps(self) -> bool:
        """Whether a training forward runs as sub-stages: recomputation asked for, or overlap with expert all-to-alls
        to hide (a MoE layer whose dispatcher exchanges tokens between processes)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        from .overlap import exchanges_async
        return self.recompute or (self.overlap and any(exchanges_async(m) for m in self.layers.modules()))

    def forward_steps(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                      labels: Optional[torch.Tensor] = None):
        """The forward as a generator that yields whenever an all-to-all is in flight and returns the outputs
        (the sub-stage protocol of schedules/overlap.py); a plain forward, in one step, when uses_steps() is False."""
        from .overlap import part_steps
        if self.uses_steps():
            return (yield from part_steps(self, x, input_ids, labels, recompute=self.recompute))
        return self._forward(x, input_ids, labels)

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                    output_grads1):
        """deepseek-ai/DualPipe's F&B hook: module0's forward interleaved with the backward of module1's chunk."""
        from .overlap import overlapped_forward_backward
        return overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
                                           output_grads1)

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        if self.uses_steps():
            from .overlap import run_steps
            return run_steps(self.forward_steps(x, input_ids, labels))
        return self._forward(x, input_ids, labels)

    def _forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None):
        model = self._model[0]
        h = model.embed_tokens(x) if self.first else x          # first: x = input_ids [B, T]; else h [B, T, C]
        for layer in self.layers:
            h = layer(h)
        aux = take_balance_losses(self.layers) if self.training else None  # this part's layers only, right now
        if not self.last:
            return h if aux is None else AttachLoss.apply(h, aux, self.loss_scale)
        loss, metrics = model.final(h, input_ids, labels)
        if aux is not None:
            loss = loss + aux
        self.metrics.append({k: float(v) for k, v in metrics.items()})
        return loss * self.loss_scale


def part_sizes(num_layers: int, num_parts: int, sizes: Optional[Sequence[int]] = None) -> list[int]:
    """Layers per part: given explicitly, or balanced with the remainder going to the middle parts (the outer ones
    also carry the embedding and the head)."""
    if sizes is not None:
        sizes = list(sizes)
        if len(sizes) != num_parts or sum(sizes) != num_layers or min(sizes) < 1:
            raise ValueError(f"parallel.layers_per_part={sizes}: needs {num_parts} entries >= 1 summing to "
                             f"model.num_hidden_layers={num_layers}")
        return sizes
    if num_layers < num_parts:
        raise ValueError(f"model.num_hidden_layers={num_layers}: fewer layers than the {num_parts} pipeline parts")
    base, extra = divmod(num_layers, num_parts)
    order = sorted(range(num_parts), key=lambda i: abs(i - (num_parts - 1) / 2))  # middle first
    out = [base] * num_parts
    for i in order[:extra]:
        out[i] += 1
    return out


def split_model(model: nn.Module, num_parts: int, sizes: Optional[Sequence[int]] = None) -> list[ModelPart]:
    sizes = part_sizes(len(model.layers), num_parts, sizes)
    parts, start = [], 0
    for i, n in enumerate(sizes):
        parts.append(ModelPart(model, start, start + n, first=i == 0, last=i == num_parts - 1))
        start += n
    return parts
