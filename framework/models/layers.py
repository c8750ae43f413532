"""Building blocks shared by the model families, and recomputation in backward.

Recomputation (V3 §3.3: RMSNorm outputs and the SwiGLU products silu(gate) * up are not kept for backward but
recomputed there): `recomputed` runs a piece under torch.utils.checkpoint with a policy that keeps GEMM outputs. A
layer that defers its weight gradient (framework/weight_grad.py) holds the weight by handle, not as a saved tensor,
so the deferred gradient lands in the parameter itself, not in the alias a checkpoint hands back: norms and routed
experts may defer inside recomputed pieces.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from framework.weight_grad import scale

_aten = torch.ops.aten
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
          _aten._grouped_mm.default}


def _keep_gemm_outputs(ctx, op, *args, **kwargs):
    # GEMM outputs are costly to redo and are the SwiGLU's inputs; everything else (norms, silu, products) is cheap
    return CheckpointPolicy.MUST_SAVE if op in _GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def recomputed(fn: Callable, *args):
    """fn(*args), keeping for backward only its inputs and GEMM outputs; the rest is recomputed there.

    fn must be free of communication and side effects (it runs twice); its layers may defer their weight
    gradients (see the module doc).
    """
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_gemm_outputs))


def maybe_recomputed(module: nn.Module, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """module(x), recomputed in backward when asked (for pieces without GEMMs of their own: norms)."""
    return recomputed(module, x) if recompute else module(x)


def swiglu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    defers_weight_grad = True  # the scale's gradient can wait for W (framework/weight_grad.py)

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 even for bf16 inputs (V3 §3.3 keeps norms in high precision)
        xf = x.float()
        return scale((xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x), self.weight)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names follow Hugging Face (gate_proj/up_proj/down_proj)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_recomputed(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) keeping the three GEMMs' inputs and outputs: silu(gate) * up is recomputed in backward (the
        linears may defer their weight gradients)."""
        return self.down_proj(recomputed(swiglu_product, self.gate_proj(x), self.up_proj(x)))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim/2] for the half-split rotary layout (Llama / GPT-NeoX)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by position; cos/sin [T, D/2]. Pairs are (i, i + D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy; labels == -100 are ignored. logits [B, T, V], labels [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
