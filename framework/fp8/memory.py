"""What the linears keep for backward: bytes of the tensors autograd saves, measured with saved_tensors_hooks.

V3 §3.3.3 caches the inputs of the linears in FP8 (1 byte per element + one fp32 scale per 1x128 tile) where a
bf16 run keeps 2 bytes per element. This module measures it on a real forward pass instead of assuming it:
every tensor saved while a GEMM site runs (an Fp8Linear, a Bf16EmulatedLinear, or the `linear_fn` of MoE experts)
is counted, and sorted into

  activations     copies of the GEMM inputs (values and their scales)
  weight_copies   reduced-precision copies of the weights (FP8 values + 128x128 block scales, or bf16)

by shape: a saved tensor shaped like one of the site's weights, or like that weight's block-scale grid
[..., ceil(N/128), ceil(K/128)] in fp32, is a weight copy. That is exact as long as the token count of a call
differs from those row counts, which callers can check with `ambiguous_token_counts`. Tensors that share storage
with a parameter cost nothing extra and are not counted. The forward's whole saved set (every module, unique
storages, parameters excluded) is reported too, to show the linears' share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .bf16_emulation import Bf16EmulatedLinear
from .linear import Fp8Linear
from .quantize import BLOCK


@dataclass
class SavedBytes:
    activations: int = 0      # GEMM inputs kept by the linears for backward
    weight_copies: int = 0    # reduced-precision weight copies kept by the linears
    model_total: int = 0      # everything autograd saved in the forward (unique storages, parameters excluded)
    sites: int = 0            # GEMM calls seen


def _weight_shapes(weights):
    shapes = set()
    for w in weights:
        *lead, n, k = w.shape
        shapes.add((tuple(w.shape), None))
        shapes.add(((*lead, math.ceil(n / BLOCK), math.ceil(k / BLOCK)), torch.float32))
    return shapes


def _is_weight_copy(t, shapes):
    return any(tuple(t.shape) == shape and (dtype is None or t.dtype == dtype) for shape, dtype in shapes)


def ambiguous_token_counts(model: nn.Module) -> set[int]:
    """Row counts a plain linear's input must avoid for the activation / weight-copy split to be exact: the weights'
    out-features and their block counts (expert weights are 3-D, so expert inputs never collide)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, (Fp8Linear, Bf16EmulatedLinear)):
            out |= {m.out_features, math.ceil(m.out_features / BLOCK)}
    return out


def saved_tensor_bytes(model: nn.Module, forward: Callable[[], object]) -> SavedBytes:
    """Run `forward()` (a training-mode forward of `model`, with grad) and count what autograd saves."""
    if not torch.is_grad_enabled():
        raise ValueError("saved_tensor_bytes needs grad enabled: nothing is saved for backward under no_grad")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    result = SavedBytes()
    storages: dict[int, int] = {}
    scope: list = []  # weight shapes of the GEMM site running now (innermost last)

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in params:
            return t
        storages[ptr] = t.untyped_storage().nbytes()
        if scope:
            nbytes = t.numel() * t.element_size()
            if _is_weight_copy(t, scope[-1]):
                result.weight_copies += nbytes
            else:
                result.activations += nbytes
        return t

    def enter(shapes):
        scope.append(shapes)
        result.sites += 1

    handles, hooked = [], []
    for name, m in model.named_modules():
        if isinstance(m, (Fp8Linear, Bf16EmulatedLinear)):
            shapes = _weight_shapes([m.weight])
            handles.append(m.register_forward_pre_hook(lambda mod, args, s=shapes: enter(s)))
            handles.append(m.register_forward_hook(lambda mod, args, out: scope.pop() and None))  # None: keep out
        elif getattr(m, "linear_fn", None) is not None:
            inner = m.linear_fn

            def counted(x, counts, weight, proj, inner=inner):
                enter(_weight_shapes([weight]))
                try:
                    return inner(x, counts, weight, proj)
                finally:
                    scope.pop()

            hooked.append((m, inner))
            m.linear_fn = counted
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in handles:
            h.remove()
        for m, inner in hooked:
            m.linear_fn = inner
    result.model_total = sum(storages.values())
    return result
