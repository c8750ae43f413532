"""The point-to-point actions between neighbouring stages of one (stage, micro-batch).

Every schedule generator builds its SEND/RECV actions with these four, so that a SEND and its RECV are always spelled
the same way (stage = the sending stage). Each returns an empty list where the neighbour is on the same rank (the
executor hands the tensor over directly) or where there is no neighbour.
"""
from __future__ import annotations

from .actions import Action, Layout


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
