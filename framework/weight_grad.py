"""How a weight's gradient is computed, declared so that it can run now or later (the W of zero-bubble).

Zero-bubble schedules (ZB1P, DualPipe; V3 §3.2.1, Figure 4) split a layer's backward in two: B computes the input
gradient at once, so that the previous stage can start its own backward, and W computes the weight gradient when the
rank would otherwise idle. Autograd has no notion of "later", so every layer with trainable weights computes its
backward in its own autograd Function and hands its weight-gradient computation to `weight_grads`:

    dx = ...                                                    # B: input gradient, now
    return (dx, *weight_grads(ctx, (weight, bias), lambda: (dw, db)))

With `WeightGradStore.enabled` False this is an ordinary backward (the closure runs at once and autograd accumulates
its result). With it True the closure goes to the store, together with the parameters it writes (`deferred.params`,
which the pipeline executor and the mirror exchange read to know when a parameter's gradient is final), and the
pipeline's W action runs it; it then accumulates into `.grad` the way AccumulateGrad does. One mechanism for every
layer kind: plain, FP8 and bf16-emulated linears, grouped and per-expert MoE GEMMs, embeddings, norm scales and the
absorbed-MLA projections are all written this way (modules say so with `defers_weight_grad = True`).

Weights are held by handle, never through save_for_backward: a deferred gradient must land in the parameter's own
`.grad`, and under torch.utils.checkpoint a saved tensor comes back as a detached alias whose `.grad` nobody reads.
A weight that is itself computed (e.g. dequantized, or a dtype cast) is not a leaf: its gradient always takes
autograd's immediate path, which is right whatever the store says.

`WeightGradStore` keeps the names and semantics of deepseek-ai/DualPipe's utility (enabled, cache, funcs_queue, put,
flush, pop, clear), so user layers written against that library work unchanged.
"""
from __future__ import annotations

import queue
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightGradStore:
    """Process-global store of deferred weight-gradient closures.

    enabled     while True, layers `put` their weight-gradient closure here instead of running it
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
        run_weight_grads(cls.funcs_queue.get())

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


@torch.no_grad()
def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    # autograd is out of the loop for a deferred gradient, so accumulate the way AccumulateGrad does: a fresh
    # gradient is taken as it is, a view (e.g. of a reduction) is copied so that .grad owns its storage
    if param.grad is None:
        param.grad = grad if grad._base is None else grad.clone()
    else:
        param.grad += grad


def weight_grads(ctx, weights: Sequence[Optional[torch.Tensor]], compute: Callable[[], Sequence]) -> tuple:
    """The weight-gradient half of an autograd Function's backward: what it returns for `weights`.

    weights: the Function's weight inputs, which are its forward arguments 1, 2, ... (argument 0 is the input; None
    for an absent one, e.g. no bias); compute() -> one gradient (or None) per weight. Returns `compute()`'s result
    now (store disabled, or a weight that is not a leaf), else Nones after handing the store a closure that
    computes the same gradients and accumulates them into the weights.
    """
    wants = [w is not None and ctx.needs_input_grad[1 + i] for i, w in enumerate(weights)]
    if not any(wants):
        return (None,) * len(weights)
    leaves = all(not want or w.grad_fn is None for w, want in zip(weights, wants))
    if not (WeightGradStore.enabled and leaves):
        grads = tuple(compute())
        return tuple(g if want else None for g, want in zip(grads, wants))

    @torch.no_grad()  # as inside autograd's backward: saved activations that require grad must not build a graph
    def gradients() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(w, g) for w, g, want in zip(weights, compute(), wants) if want and g is not None]

    def deferred():
        for w, g in gradients():
            _accumulate(w, g)

    # the parameters it writes, for callers that act as soon as a parameter's gradient is final, and the gradients
    # without accumulating them, for run_weight_grads to add up a weight used more than once first
    deferred.params = tuple(w for w, want in zip(weights, wants) if want)
    deferred.gradients = gradients
    WeightGradStore.put(deferred)
    return (None,) * len(weights)


def run_weight_grads(funcs: Sequence[Callable[[], None]],
                     finished: Optional[Callable[[list[torch.Tensor]], None]] = None) -> None:
    """Run one W: the closures one backward left, in the order it left them.

    A weight written by several closures (a layer called twice in the chunk, e.g. a head shared with multi-token
    prediction) gets its contributions added up first, in the order autograd would have added them, and accumulated
    once, as AccumulateGrad does: the same bits as the backward that did not defer (accumulating each contribution
    into an existing .grad in turn would round differently). Closures without `gradients` (a user's, written
    against deepseek-ai/DualPipe's store) simply run. finished(params), after each closure, gets the weights whose
    gradient that closure completed."""
    left: dict[int, int] = {}
    for f in funcs:
        for p in getattr(f, "params", ()):
            left[id(p)] = left.get(id(p), 0) + 1
    partial: dict[int, torch.Tensor] = {}
    for f in funcs:
        gradients = getattr(f, "gradients", None)
        if gradients is None:
            f()
        else:
            for w, g in gradients():
                partial[id(w)] = g if id(w) not in partial else partial[id(w)] + g
        done = []
        for w in getattr(f, "params", ()):
            left[id(w)] -= 1
            if left[id(w)] == 0:
                if id(w) in partial:
                    _accumulate(w, partial.pop(id(w)))
                done.append(w)
        if finished is not None and done:
            finished(done)


# --------------------------------------------------------------------------------------------------------------------
# Linear (also the router gate, the output head, MTP's projection, every nn.Linear swapped to SplitLinear)
# --------------------------------------------------------------------------------------------------------------------

class SplitLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b; dW and db through `weight_grads`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias = weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None          # [..., in]

        def compute():
            g2 = grad_out.reshape(-1, grad_out.shape[-1])                         # [tokens, out]
            gw = g2.t() @ x.reshape(-1, x.shape[-1])                              # [out, in]
            return gw, (g2.sum(0) if bias is not None else None)                  # [out]

        return (grad_x, *weight_grads(ctx, (weight, bias), compute))


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear whose weight gradient may be deferred (see SplitLinearFunction)."""
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return SplitLinearFunction.apply(x, weight, bias)


class SplitLinear(nn.Linear):
    """nn.Linear whose backward can defer dW/db to WeightGradStore; parameters and state_dict are nn.Linear's."""
    defers_weight_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # autocast casts a plain linear's operands, a custom Function's it does not: run as nn.Linear (its
            # weight gradient then comes in B, through the cast, as it would have without the split)
            return super().forward(x)
        return split_linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------------------------

class SplitEmbeddingFunction(torch.autograd.Function):
    """weight[ids]; token ids have no gradient, so B does nothing and W scatters the rows' gradients."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        # the same kernel autograd runs for F.embedding (no padding index, no frequency scaling)
        compute = lambda: (torch.ops.aten.embedding_dense_backward(grad_out, ids, weight.shape[0], -1, False),)
        return (None, *weight_grads(ctx, (weight,), compute))


class SplitEmbedding(nn.Embedding):
    """nn.Embedding whose weight gradient can be deferred (padding_idx, max_norm and sparse are not supported)."""
    defers_weight_grad = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if (self.padding_idx is not None or self.max_norm is not None or self.scale_grad_by_freq or self.sparse
                or not torch.is_grad_enabled()):
            return super().forward(ids)
        return SplitEmbeddingFunction.apply(ids, self.weight)


# --------------------------------------------------------------------------------------------------------------------
# Elementwise scale (the weight of a norm)
# --------------------------------------------------------------------------------------------------------------------

class ScaleFunction(torch.autograd.Function):
    """x * weight, weight broadcast over the leading dims; d(weight) = sum over them of dy * x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight = weight
        return x * weight

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_out * weight if ctx.needs_input_grad[0] else None
        # sum_to_size: the reduction autograd applies to a broadcast operand's gradient
        compute = lambda: ((grad_out * x).sum_to_size(weight.shape).to(weight.dtype),)
        return (grad_x, *weight_grads(ctx, (weight,), compute))


def scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x * weight whose weight gradient may be deferred."""
    if not torch.is_grad_enabled() or x.dtype != torch.promote_types(x.dtype, weight.dtype):
        return x * weight  # a product in another dtype than x's: keep autograd's own type handling
    return ScaleFunction.apply(x, weight)


# --------------------------------------------------------------------------------------------------------------------
# Per-group GEMMs (MoE routed experts)
# --------------------------------------------------------------------------------------------------------------------

def _loop_gemm(a: torch.Tensor, b: torch.Tensor, counts: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = a[start:start + n] @ b[e]
        start += n
    return out


class GroupedLinearFunction(torch.autograd.Function):
    """Rows [start_e, start_e + count_e) of x times weight[e]^T, for every group e; weight [E, N, K], x [M, K].

    offs (int32 cumulative counts) selects torch._grouped_mm; counts (host ints) the per-group matmul loop, which
    runs any dtype (float64 reference runs). Both keep x for the weight gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offs: Optional[torch.Tensor], counts):
        ctx.grouped = offs is not None
        ctx.save_for_backward(*((x, offs) if ctx.grouped else (x,)))
        ctx.weight, ctx.counts = weight, counts
        w = weight.to(x.dtype)
        if ctx.grouped:
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)                   # [M, N]
        return _loop_gemm(x, w.transpose(1, 2), counts, x.new_zeros(x.shape[0], w.shape[1]))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *rest = ctx.saved_tensors
        weight, counts = ctx.weight, ctx.counts
        dy = grad_out.contiguous()   # torch._grouped_mm rejects stride-0 (expanded) operands such as .sum()'s
        w = weight.to(x.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (torch._grouped_mm(dy, w, offs=rest[0]) if ctx.grouped
                      else _loop_gemm(dy, w, counts, dy.new_zeros(dy.shape[0], w.shape[2])))    # [M, K]

        def compute():
            if ctx.grouped:   # dW_e = dY_e^T X_e: the groups cut the rows, the dim this GEMM reduces over
                gw = torch._grouped_mm(dy.t(), x, offs=rest[0])                         # [E, N, K]
            else:
                gw, start = torch.zeros(weight.shape, dtype=x.dtype, device=x.device), 0
                for e, n in enumerate(counts):
                    if n:
                        gw[e] = dy[start:start + n].t() @ x[start:start + n]
                    start += n
            return (gw.to(weight.dtype),)

        return (grad_x, *weight_grads(ctx, (weight,), compute), None, None)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int] = None,
                   offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] sorted by group, weight [E, N, K] -> [M, N]: torch._grouped_mm with `offs` (int32 end row of each
    group), else a matmul per group with `counts` (host ints). The weight gradient may be deferred."""
    if offs is None and counts is None:
        raise ValueError("grouped_linear needs offs (grouped GEMM) or counts (per-group loop)")
    return GroupedLinearFunction.apply(x, weight, offs, None if counts is None else tuple(int(c) for c in counts))


# --------------------------------------------------------------------------------------------------------------------
# A two-operand einsum against a view of a weight (absorbed MLA: kv_b_proj's key and value halves, per head)
# --------------------------------------------------------------------------------------------------------------------

class WeightEinsumFunction(torch.autograd.Function):
    """einsum(equation, x, view(weight)) where `view` selects a part of the weight (a view: no copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, equation: str, view: Callable):
        ctx.save_for_backward(x)
        ctx.weight, ctx.equation, ctx.view = weight, equation, view
        return torch.einsum(equation, x, view(weight))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight, view = ctx.weight, ctx.view
        ins, out = ctx.equation.split("->")
        a, b = ins.split(",")
        # with no index repeated within an operand and every index of x in the output or the weight (true of the
        # equations used here), each operand's gradient is the einsum of the other two
        grad_x = torch.einsum(f"{out},{b}->{a}", grad_out, view(weight)) if ctx.needs_input_grad[0] else None

        def compute():
            gw = torch.zeros_like(weight)
            view(gw).copy_(torch.einsum(f"{a},{out}->{b}", x, grad_out))
            return (gw,)

        return (grad_x, *weight_grads(ctx, (weight,), compute), None, None)


def weight_einsum(equation: str, x: torch.Tensor, weight: torch.Tensor, view: Callable) -> torch.Tensor:
    """torch.einsum(equation, x, view(weight)) whose weight gradient may be deferred; `view` must return a view."""
    if not torch.is_grad_enabled():
        return torch.einsum(equation, x, view(weight))
    return WeightEinsumFunction.apply(x, weight, equation, view)
