"""Split a linear layer's backward into B (input gradient, now) and W (weight gradient, later).

Zero-bubble schedules (ZB1P, DualPipe; V3 §3.2.1) fill pipeline bubbles with weight-gradient work: B computes
dL/dx so the previous stage can start its own backward at once, W computes dL/dW when the rank would otherwise
idle. Autograd has no notion of "later", so a split linear hands its weight-gradient computation to
`WeightGradStore` as a closure whenever the store is enabled; the pipeline runs the closures at the W action.

`WeightGradStore` keeps the names and semantics of deepseek-ai/DualPipe's utility (enabled, cache, funcs_queue,
put, flush, pop, clear) so that user layers written against that library work unchanged.
"""
from __future__ import annotations

import queue
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightGradStore:
    """Process-global store of deferred weight-gradient closures.

    enabled     while True, split layers `put` their weight-gradient closure here instead of running it
    cache       closures put since the last flush (one backward pass)
    funcs_queue FIFO of flushed groups; `pop` runs the oldest group
    """
    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: queue.Queue = queue.Queue()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        """Close the current group: everything put since the last flush becomes one W."""
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest flushed group."""
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: the queue is empty (a W without a preceding B)")
        for func in cls.funcs_queue.get():
            func()

    @classmethod
    def take_cache(cls) -> list[Callable[[], None]]:
        """Detach and return the closures put since the last flush (the executor keys them by chunk)."""
        funcs, cls.cache = cls.cache, []
        return funcs

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = queue.Queue()


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backward from `tensors` seeded with `grad_tensors`, accumulating into leaves' .grad.

    Same contract as deepseek-ai/DualPipe's utility: the graph is freed, nothing is created for double backward,
    and tensors that do not reach a leaf are allowed.
    """
    if len(tensors) == 0:  # nothing of this chunk's outputs needs a gradient
        return
    torch.autograd.backward(tuple(tensors), tuple(grad_tensors))


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    # Autograd is out of the loop for a deferred gradient, so accumulate the way AccumulateGrad does.
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class SplitLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b whose weight/bias gradients are deferred to WeightGradStore when it is enabled."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        # weight and bias kept by handle, not saved: a deferred gradient must land in the parameter's own .grad, and
        # under torch.utils.checkpoint a saved tensor comes back as an alias whose .grad nobody reads
        ctx.weight, ctx.bias = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        want_x, want_w, want_b = ctx.needs_input_grad
        want_b = want_b and bias is not None
        grad_x = grad_out @ weight if want_x else None                      # [..., in]

        def weight_grads():
            g2 = grad_out.reshape(-1, grad_out.shape[-1])                   # [tokens, out]
            gw = g2.t() @ x.reshape(-1, x.shape[-1]) if want_w else None    # [out, in]
            gb = g2.sum(0) if want_b else None                              # [out]
            return gw, gb

        # Deferring writes .grad by hand, which is only right for leaves (parameters), never for a weight that
        # is itself computed (e.g. dequantized): those keep autograd's immediate path.
        leaves = (not want_w or weight.grad_fn is None) and (not want_b or bias.grad_fn is None)
        if WeightGradStore.enabled and (want_w or want_b) and leaves:
            def deferred():
                gw, gb = weight_grads()
                if gw is not None:
                    _accumulate(weight, gw)
                if gb is not None:
                    _accumulate(bias, gb)

            # the parameters it writes, for callers that act as soon as a parameter's gradient is final
            deferred.params = tuple(p for p, want in ((weight, want_w), (bias, want_b)) if want)
            WeightGradStore.put(deferred)
            return grad_x, None, None
        gw, gb = weight_grads()
        return grad_x, gw, gb


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose weight gradient may be deferred (see SplitLinearFunction)."""
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return SplitLinearFunction.apply(x, weight, bias)


class SplitLinear(nn.Linear):
    """nn.Linear whose backward can defer dW/db to WeightGradStore; parameters and state_dict are nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_linear(x, self.weight, self.bias)


def enable_weight_grad_split(module: nn.Module) -> int:
    """Turn every plain nn.Linear inside `module` (itself included) into a SplitLinear, in place.

    Only exact nn.Linear instances change (their class is swapped; parameters, buffers, hooks and state_dict
    keys stay as they are). Subclasses are left alone: they may implement their own split (e.g. an FP8 linear).
    Returns how many layers were converted.
    """
    converted = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = SplitLinear
            converted += 1
    return converted
