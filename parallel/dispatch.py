"""Moving MoE token rows to the experts that process them and back, in one process.

A dispatcher sits between a router and the routed experts:

    dispatch(x [N, C], topk_idx [N, K], topk_weight [N, K]) -> x_sorted [M, C], tokens_per_expert [E_local], ctx
        x_sorted holds the rows for THIS process's experts, grouped by local expert id in increasing order;
        tokens_per_expert (int64 tensor, or a list of ints) gives the group sizes (sum = M).
    combine(y_sorted [M, C], ctx) -> y [N, C]: for each token, the sum over its K choices of weight * expert output.

`LocalDispatcher` keeps every expert in this process; parallel/expert.py's ExpertParallelDispatcher sends the rows
to the ranks owning their experts. Both finish a combine with `weighted_sum`, on the rows' home rank.
"""
from __future__ import annotations

import torch


def weighted_sum(rows: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, n_tokens: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """y [n_tokens, C] with y[t] = sum of weight[m] * rows[m] over the rows m of token t (token[m] = t).

    Accumulates in fp32 at least: V3 §3.3 keeps the combine in higher precision than the expert GEMMs. rows [M, C],
    token [M], weight [M]; the result is cast to `dtype`.
    """
    acc = torch.promote_types(rows.dtype, torch.float32)
    y = rows.new_zeros(n_tokens, rows.shape[1], dtype=acc)
    return y.index_add(0, token, rows.to(acc) * weight.to(acc)[:, None]).to(dtype)


class Dispatcher:
    """What a MoE layer calls to move its rows (see the module doc)."""

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor):
        raise NotImplementedError

    def combine(self, y_sorted: torch.Tensor, ctx) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """All experts live in this process: permute rows by expert (stable argsort), un-permute with index_add."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(self, x, topk_idx, topk_weight):
        N, K = topk_idx.shape
        flat = topk_idx.reshape(-1)                                          # [N*K], row n*K+k = (token n, choice k)
        order = torch.argsort(flat, stable=True)
        token = order // K                                                   # source token of each sorted row
        x_sorted = x.index_select(0, token)                                  # [M, C]
        tokens_per_expert = torch.bincount(flat, minlength=self.n_experts)
        ctx = (token, topk_weight.reshape(-1).index_select(0, order), N)
        return x_sorted, tokens_per_expert, ctx

    def combine(self, y_sorted, ctx):
        token, weight, N = ctx
        return weighted_sum(y_sorted, token, weight, N, y_sorted.dtype)
