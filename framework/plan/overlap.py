"""How much of the expert all-to-all an F&B pair leaves exposed, turn by turn.

An F&B pair does not hide its exchanges behind "the other chunk's compute" as one lump: schedules/overlap.py cuts
each MoE block into turns and alternates the two chunks (B = the backward chunk, F = the forward chunk):

    turn   computes                            starts (after its compute, unless noted)    needs first
    B1     ATTN(B) of the block done before    COMBINE(B)                                   DISPATCH(B) of that block
    F1     ATTN(F): attention, router          COUNTS(F) (padded layout: DISPATCH(F))       COMBINE(F) of the block before
    B2     SHARED(B)                           -                                            -
    F2     SHARED(F)                           DISPATCH(F), before its compute              COUNTS(F) (counts layout)
    B3     MLP(B), then ATTN(W)                DISPATCH(B), between the two                 COMBINE(B)
    F3     MLP(F): routed experts              COMBINE(F)                                   DISPATCH(F)

One compute thread runs the turns in this order, one link carries the exchanges one at a time in the order they
were started (the 20 communication SMs and the NIC are shared by all exchanges in flight, V3 §3.2.2: two exchanges
at once would each go at half the rate, which ends them no sooner). A turn waits for the exchange it needs. The
pair's time minus its compute is what the exchanges leave exposed; `max(compute, communication)`, which assumes any
exchange can hide under any compute, is its lower bound.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockTurns:
    """Seconds of one MoE block's pieces, for one micro-batch, in an F&B pair."""
    attn_f: float
    shared_f: float
    mlp_f: float
    attn_b: float       # attention input gradients (with the recomputation they need)
    shared_b: float     # shared expert backward, weight gradients included
    mlp_b: float        # routed experts backward, weight gradients included
    attn_w: float       # attention weight gradients (held back into B3, V3 Figure 4's ATTN(W))
    dispatch_f: float
    combine_f: float
    dispatch_b: float   # the backward of the dispatch: gradients go home (a combine-direction exchange)
    combine_b: float    # the backward of the combine: gradients go to the experts
    counts: float = 0.0  # the token-count exchange before the rows (counts layout); 0 with the padded layout

    @property
    def compute(self) -> float:
        return (self.attn_f + self.shared_f + self.mlp_f + self.attn_b + self.shared_b + self.mlp_b
                + self.attn_w)

    @property
    def communication(self) -> float:
        return self.dispatch_f + self.combine_f + self.dispatch_b + self.combine_b + self.counts


def pair_time(blocks: int, t: BlockTurns, padded: bool = False) -> float:
    """Seconds of an F&B pair over `blocks` MoE blocks (the forward chunk's block k with the backward chunk's k-th
    from the top), the turns of the module docstring; the first B1 has no attention to run yet and the last
    ATTN(B) runs after the last F3."""
    if blocks <= 0:
        return 0.0
    compute = link = 0.0

    def send(at: float, seconds: float) -> float:
        nonlocal link
        link = max(link, at) + seconds
        return link

    dispatch_b = combine_f = 0.0                     # nothing to wait for before the first block
    for k in range(blocks):
        compute = max(compute, dispatch_b) + (t.attn_b if k else 0.0)                     # B1
        combine_b = send(compute, t.combine_b)
        compute = max(compute, combine_f) + t.attn_f                                      # F1
        if padded:
            dispatch_f = send(compute, t.dispatch_f)
        else:
            counts = send(compute, t.counts)
        compute += t.shared_b                                                             # B2
        if not padded:                                                                    # F2
            compute = max(compute, counts)
            dispatch_f = send(compute, t.dispatch_f)
        compute += t.shared_f
        compute = max(compute, combine_b) + t.mlp_b                                       # B3
        dispatch_b = send(compute, t.dispatch_b)
        compute += t.attn_w
        compute = max(compute, dispatch_f) + t.mlp_f                                      # F3
        combine_f = send(compute, t.combine_f)
    compute = max(compute, dispatch_b) + t.attn_b                                         # the last ATTN(B)
    return max(compute, combine_f)


def exposed(blocks: int, t: BlockTurns, padded: bool = False) -> float:
    """Seconds of the pair's exchanges that no compute covers."""
    return pair_time(blocks, t, padded) - blocks * t.compute
