"""GPipe (Huang et al. 2019): every forward first, then every backward.

Rank r holds stage r. It runs F for micro-batches 0..N-1, each one received from rank r-1 and sent on to
rank r+1 as soon as it is computed, then the full backward BW for micro-batches 0..N-1, each gradient received
from rank r+1 and sent back to rank r-1. All N activations are alive at the turn, so memory grows with N;
the bubble is (PP-1)(F+B), the same as 1F1B's.
"""
from __future__ import annotations

from .actions import Action, Layout, linear_layout
from .p2p import recv_backward_of, recv_forward_of, send_backward_of, send_forward_of


def layout(pp: int) -> Layout:
    return linear_layout(pp)


def generate(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    lay = layout(pp)
    stage = rank
    actions: list[Action] = []
    for mb in range(num_microbatches):
        actions += recv_forward_of(lay, stage, mb)
        actions.append(Action("F", stage, mb))
        actions += send_forward_of(lay, stage, mb)
    for mb in range(num_microbatches):
        actions += recv_backward_of(lay, stage, mb)
        actions.append(Action("BW", stage, mb))
        actions += send_backward_of(lay, stage, mb)
    return actions
