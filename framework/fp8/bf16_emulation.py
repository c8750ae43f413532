"""BF16 GEMMs emulated in fp32: the baseline FP8 training is compared against on CPU.

A bf16 matmul runs about 100x slower than fp32 on x86 CPUs without AMX (torch has no fast bf16 kernel there), so the baseline rounds both operands of each
linear's three GEMMs to bf16 and multiplies in fp32: the numerics of a bf16 tensor-core GEMM with fp32 accumulation,
at fp32 speed. Gradients w.r.t. the outputs are rounded to bf16 too, as they would be stored in bf16 training.

What is kept for backward is the bf16 copy itself (2 bytes per element, as a bf16 run holds): rounding already
happened, so storing it in bfloat16 loses nothing, and the saved bytes compare honestly with the FP8 linears'.
The MoE experts get the same treatment through their `linear_fn` hook (Bf16ExpertGemms).
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

from framework.weight_grad import weight_grads
from .linear import expert_segments


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


class Bf16EmulatedLinearFunction(torch.autograd.Function):
    """y = bf16(x) @ bf16(W)^T + b in x's dtype; dX = bf16(dY) @ bf16(W), dW = bf16(dY)^T @ bf16(x)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)  # the bf16 copies: 2 bytes per element
        ctx.weight, ctx.bias = weight, bias  # by handle: their gradients may be deferred (framework/weight_grad.py)
        ctx.x_dtype = x.dtype
        y = xb.to(x.dtype) @ wb.to(x.dtype).t()
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, dy):
        xb, wb = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        dyb = _bf16(dy)
        dx = dyb @ wb.to(dy.dtype)

        def compute():
            dw = dyb.reshape(-1, dyb.shape[-1]).t() @ xb.reshape(-1, xb.shape[-1]).to(dy.dtype)
            db = dy.reshape(-1, dy.shape[-1]).sum(0) if bias is not None else None
            return dw.to(weight.dtype), db

        return (dx.to(ctx.x_dtype), *weight_grads(ctx, (weight, bias), compute))


class Bf16EmulatedLinear(nn.Linear):
    defers_weight_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Bf16EmulatedLinearFunction.apply(x, self.weight, self.bias)


class Bf16GroupedFunction(torch.autograd.Function):
    """Expert e maps rows [start_e, start_e + count_e) of x with weights[e]; the three GEMMs of each expert as in
    Bf16EmulatedLinearFunction (operands rounded to bf16, products in fp32)."""

    @staticmethod
    def forward(ctx, x, weights, segments):
        xb, wb = x.to(torch.bfloat16), weights.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.weight = weights  # by handle: its gradient may be deferred (framework/weight_grad.py)
        ctx.meta = (segments, x.dtype)
        xf, wf = xb.to(x.dtype), wb.to(x.dtype)
        out = x.new_zeros(x.shape[0], weights.shape[1])  # [T, N]
        for e, (s, c) in enumerate(segments):
            if c:
                out[s:s + c] = xf[s:s + c] @ wf[e].t()
        return out

    @staticmethod
    def backward(ctx, dy):
        xb, wb = ctx.saved_tensors
        segments, x_dtype = ctx.meta
        weights = ctx.weight
        dyb = _bf16(dy)
        xf, wf = xb.to(dy.dtype), wb.to(dy.dtype)
        dx = dy.new_zeros(dy.shape[0], wb.shape[2])
        for e, (s, c) in enumerate(segments):
            if c:
                dx[s:s + c] = dyb[s:s + c] @ wf[e]

        def compute():
            dw = torch.zeros(wb.shape, dtype=dy.dtype, device=dy.device)
            for e, (s, c) in enumerate(segments):
                if c:
                    dw[e] = dyb[s:s + c].t() @ xf[s:s + c]
            return (dw.to(weights.dtype),)

        return (dx.to(x_dtype), *weight_grads(ctx, (weights,), compute), None)


def bf16_grouped(x: torch.Tensor, counts, weights: torch.Tensor) -> torch.Tensor:
    """Per-expert x_e @ W_e^T with bf16-rounded operands (and bf16-rounded output gradients in backward); the MoE
    experts' counterpart of the linear above. x [T, K] sorted by expert, counts [E] summing to T, weights [E, N, K]
    -> [T, N] in x's dtype."""
    if x.dim() != 2 or weights.dim() != 3 or weights.shape[2] != x.shape[1]:
        raise ValueError(f"x must be [T, K] and weights [E, N, K] with the same K, got x {tuple(x.shape)} and "
                         f"weights {tuple(weights.shape)}")
    segments = tuple(expert_segments(counts, x.shape[0]))
    if len(segments) != weights.shape[0]:
        raise ValueError(f"counts has {len(segments)} experts but weights has {weights.shape[0]}")
    return Bf16GroupedFunction.apply(x, weights, segments)


class Bf16ExpertGemms:
    """The `linear_fn` of a MoE Experts module under train.dtype=bf16_emulated: both expert GEMMs via bf16_grouped."""

    defers_weight_grad = True

    def __call__(self, x_sorted, counts, weight, proj):
        return bf16_grouped(x_sorted, counts, weight)

    def __repr__(self):
        return "Bf16ExpertGemms()"


def convert_to_bf16_emulation(model: nn.Module, exclude=()) -> list[str]:
    """Swap nn.Linear modules (not matching `exclude` name patterns) for Bf16EmulatedLinear, in place, keeping
    parameters and state_dict keys, and route the GEMMs of every MoE Experts module (same rule on its name) through
    bf16_grouped. Returns the converted names in module order."""
    from .linear import _check_exclude, expert_modules

    _check_exclude(exclude)
    experts = dict(expert_modules(model, exclude))
    done = []
    for name, mod in model.named_modules():
        if name in experts:
            mod.linear_fn = Bf16ExpertGemms()
            done.append(name)
        elif type(mod) is nn.Linear and not any(fnmatch.fnmatchcase(name, p) for p in exclude):
            mod.__class__ = Bf16EmulatedLinear
            done.append(name)
    return done
