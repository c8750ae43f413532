"""ZB-H1, the 1F1B-memory zero-bubble schedule (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §2.2).

The backward is split into B (input gradient, on the critical path) and W (weight gradient, deferrable).
Rank r: warm-up PP-1-r forwards; then r rounds of F + B whose W is deferred, so the gradient reaches rank 0
sooner; then steady rounds F, B, W; then the cool-down B, W rounds; finally the r deferred W fill the tail bubble.
Deferred W run oldest first (a FIFO, as the reference's weight-gradient store). Rank 0 sends no input gradient,
so it runs full backwards BW. Bubble (PP-1)(F+B-2W) in the V3 Table 2 notation (B = full backward) when W <= F.
"""
from __future__ import annotations

from collections import deque

from .actions import Action, Layout, linear_layout
from .p2p import recv_backward_of, recv_forward_of, send_backward_of, send_forward_of


def layout(pp: int) -> Layout:
    return linear_layout(pp)


def generate(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    lay = layout(pp)
    s, n = rank, num_microbatches
    actions: list[Action] = []
    pending_w: deque[int] = deque()       # micro-batches whose B ran and whose W is deferred, oldest first
    fwd = bwd = 0

    def forward():
        nonlocal fwd
        actions.extend(recv_forward_of(lay, s, fwd))
        actions.append(Action("F", s, fwd))
        fwd += 1

    def backward(then_w: bool):
        nonlocal bwd
        if rank == 0:                       # nothing to send back: no reason to split the backward
            actions.append(Action("BW", s, bwd))
        else:
            actions.append(Action("B", s, bwd))
            actions.extend(send_backward_of(lay, s, bwd))
            pending_w.append(bwd)
            if then_w:
                actions.append(Action("W", s, pending_w.popleft()))
        bwd += 1

    for _ in range(min(pp - 1 - rank, n)):          # warm-up
        forward()
        actions.extend(send_forward_of(lay, s, fwd - 1))
    for _ in range(rank):                           # F + B, W deferred
        if fwd == n:
            break
        forward()
        # the gradient request goes out with the activation, as the reference batches them
        actions.extend(recv_backward_of(lay, s, bwd) + send_forward_of(lay, s, fwd - 1))
        backward(then_w=False)
    while fwd < n:                                  # steady state: F, B, W
        forward()
        actions.extend(recv_backward_of(lay, s, bwd) + send_forward_of(lay, s, fwd - 1))
        backward(then_w=True)
    while bwd < n:                                  # cool-down: B, W
        actions.extend(recv_backward_of(lay, s, bwd))
        backward(then_w=True)
    while pending_w:                                # the deferred W fill the tail bubble
        actions.append(Action("W", s, pending_w.popleft()))
    return actions
