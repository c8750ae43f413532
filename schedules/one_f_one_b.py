"""1F1B (PipeDream-Flush, Narayanan et al. 2021), in Megatron-LM's order of computation and communication.

Rank r holds stage r. Warm-up: min(PP-1-r, N) forwards. Steady state: one forward, then one full backward (BW)
of the oldest micro-batch still in flight, so at most PP-r activations are alive on rank r. Cool-down: the
backwards left. A forward's output goes out together with the request for the next gradient, a backward's input
gradient together with the request for the next activation, as Megatron pairs them.
Any N >= 1 is accepted; with N < PP the warm-up is cut short and the bubble is no longer (PP-1)(F+B).
"""
from __future__ import annotations

from .actions import Action, Layout, linear_layout
from .p2p import recv_backward_of, recv_forward_of, send_backward_of, send_forward_of


def layout(pp: int) -> Layout:
    return linear_layout(pp)


def generate(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    lay = layout(pp)
    s, n = rank, num_microbatches
    warmup = min(pp - 1 - rank, n)
    steady = n - warmup
    actions: list[Action] = []

    for mb in range(warmup):
        actions += recv_forward_of(lay, s, mb)
        actions.append(Action("F", s, mb))
        actions += send_forward_of(lay, s, mb)

    if steady > 0:
        actions += recv_forward_of(lay, s, warmup)
    for i in range(steady):
        fwd, bwd = warmup + i, i
        actions.append(Action("F", s, fwd))
        actions += send_forward_of(lay, s, fwd) + recv_backward_of(lay, s, bwd)
        actions.append(Action("BW", s, bwd))
        actions += send_backward_of(lay, s, bwd)
        if i < steady - 1:
            actions += recv_forward_of(lay, s, fwd + 1)

    for bwd in range(steady, n):
        actions += recv_backward_of(lay, s, bwd)
        actions.append(Action("BW", s, bwd))
        actions += send_backward_of(lay, s, bwd)
    return actions
