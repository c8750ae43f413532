"""GPipe (Huang et al. 2019): every forward first, then every backward.

Rank r holds stage r. It runs F for micro-batches 0..N-1, each one received from rank r-1 and sent on to
rank r+1 as soon as it is computed, then the full backward BW for micro-batches 0..N-1, each gradient received
from rank r+1 and sent back to rank r-1. All N activations are alive at the turn, so memory grows with N;
the bubble is (PP-1)(F+B), the same as 1F1B's.

The four `*_of` functions below build the point-to-point actions between neighbouring stages; every generator
uses them so that a SEND and its RECV are always spelled the same way (stage = the sending stage).
"""
from __future__ import annotations

from .actions import Action, Layout, linear_layout


def layout(pp: int) -> Layout:
    return linear_layout(pp)


# ---- point-to-point actions of one (stage, micro-batch); an empty list where the neighbour is on the same rank ----

def recv_forward_of(lay: Layout, stage: int, mb: int) -> list[Action]:
    """The activation `stage` needs from its previous stage."""
    prev = lay.prev_stage(stage)
    if prev is None or lay.stage_to_rank[prev] == lay.stage_to_rank[stage]:
        return []
    return [Action("RECV_F", prev, mb, peer=lay.stage_to_rank[prev])]


def send_forward_of(lay: Layout, stage: int, mb: int) -> list[Action]:
    """The activation `stage` produced, for its next stage."""
    nxt = lay.next_stage(stage)
    if nxt is None or lay.stage_to_rank[nxt] == lay.stage_to_rank[stage]:
        return []
    return [Action("SEND_F", stage, mb, peer=lay.stage_to_rank[nxt])]


def recv_backward_of(lay: Layout, stage: int, mb: int) -> list[Action]:
    """The gradient of `stage`'s output, computed by its next stage."""
    nxt = lay.next_stage(stage)
    if nxt is None or lay.stage_to_rank[nxt] == lay.stage_to_rank[stage]:
        return []
    return [Action("RECV_B", nxt, mb, peer=lay.stage_to_rank[nxt])]


def send_backward_of(lay: Layout, stage: int, mb: int) -> list[Action]:
    """The gradient of `stage`'s input, for its previous stage."""
    prev = lay.prev_stage(stage)
    if prev is None or lay.stage_to_rank[prev] == lay.stage_to_rank[stage]:
        return []
    return [Action("SEND_B", stage, mb, peer=lay.stage_to_rank[prev])]


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
