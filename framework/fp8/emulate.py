"""BF16 GEMMs emulated in fp32: the baseline FP8 training is compared against on CPU.

A bf16 matmul runs ~100x slower than fp32 on these CPUs (PLATFORM.md), so the baseline rounds both operands of each
linear's three GEMMs to bf16 and multiplies in fp32: the numerics of a bf16 tensor-core GEMM with fp32 accumulation,
at fp32 speed. Gradients w.r.t. the outputs are rounded to bf16 too, as they would be stored in bf16 training.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


class Bf16EmulatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = _bf16(x), _bf16(weight)
        ctx.save_for_backward(xb, wb)
        ctx.has_bias = bias is not None
        y = xb @ wb.t()
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        xb, wb = ctx.saved_tensors
        dyb = _bf16(dy)
        dx = dyb @ wb
        dw = dyb.reshape(-1, dyb.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1])
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias else None
        return dx, dw, db


class Bf16EmulatedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Bf16EmulatedLinearFunction.apply(x, self.weight, self.bias)


def bf16_grouped(x: torch.Tensor, counts, weights: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ W_e^T with bf16-rounded operands; the MoE experts' counterpart of the linear above."""
    outs, start = [], 0
    wb = _bf16(weights)
    xb = _bf16(x)
    for e, n in enumerate(torch.as_tensor(counts).tolist()):
        outs.append(xb[start:start + n] @ wb[e].t())
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, weights.shape[1])


def convert_to_bf16_emulation(model: nn.Module, exclude=()) -> list[str]:
    """Swap nn.Linear modules (not matching `exclude` name patterns) for Bf16EmulatedLinear, in place, keeping
    parameters and state_dict keys."""
    done = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and not any(fnmatch.fnmatch(name, p) for p in exclude):
            mod.__class__ = Bf16EmulatedLinear
            done.append(name)
    return done
