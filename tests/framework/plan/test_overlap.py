"""The F&B turn model (framework/plan/overlap.py) against hand-worked timelines and its bounds."""
from __future__ import annotations

import random

import pytest

from framework.plan.overlap import BlockTurns, exposed, pair_time

# compute 9 per block, exchanges 9.5 (counts 0.5)
HAND = BlockTurns(attn_f=1, shared_f=1, mlp_f=1, attn_b=2, shared_b=1, mlp_b=2, attn_w=1,
                  dispatch_f=3, combine_f=1, dispatch_b=1, combine_b=4, counts=0.5)


def test_one_block_by_hand():
    # counts layout: COMBINE(B) 0-4 | COUNTS 4-4.5 | F2 waits to 4.5, DISPATCH(F) 4.5-7.5 | B3 4.5+1 -> 7.5,
    # DISPATCH(B) 7.5-8.5, ATTN(W) -> 8.5 | F3 8.5-9.5, COMBINE(F) 9.5-10.5 | last ATTN(B) 9.5-11.5
    assert pair_time(1, HAND) == 11.5
    assert exposed(1, HAND) == 2.5
    # padded: DISPATCH(F) leaves after F1 (4-7), no counts: B3 4-6, DISPATCH(B) 7-8, ATTN(W) 6-7, F3 7-8,
    # COMBINE(F) 8-9, last ATTN(B) 8-10
    assert pair_time(1, HAND, padded=True) == 10
    assert exposed(1, HAND, padded=True) == 1


def test_without_exchanges_the_pair_is_its_compute():
    free = BlockTurns(**{**HAND.__dict__, "dispatch_f": 0, "combine_f": 0, "dispatch_b": 0, "combine_b": 0,
                         "counts": 0})
    for n in (1, 2, 5):
        assert pair_time(n, free) == n * HAND.compute
        assert exposed(n, free) == 0


def test_without_compute_the_exchanges_queue_on_the_link():
    idle = BlockTurns(**{**HAND.__dict__, "attn_f": 0, "shared_f": 0, "mlp_f": 0, "attn_b": 0, "shared_b": 0,
                         "mlp_b": 0, "attn_w": 0})
    for n in (1, 3):
        assert pair_time(n, idle) == pytest.approx(n * HAND.communication)


def test_pair_is_bounded_by_compute_communication_and_their_sum():
    rng = random.Random(0)
    for _ in range(200):
        t = BlockTurns(*[rng.uniform(0, 3) for _ in range(12)])
        n = rng.randint(1, 4)
        p = pair_time(n, t)
        assert max(n * t.compute, n * t.communication) - 1e-9 <= p <= n * (t.compute + t.communication) + 1e-9
