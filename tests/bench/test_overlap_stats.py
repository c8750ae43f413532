"""bench/overlap.py's accounting on synthetic exchange records: exposed time, the late-peer split, the scopes.

No processes are spawned: records, waits and peer start times are set by hand, so every expected number is exact
arithmetic (seconds; t0 = 100).
"""
from __future__ import annotations

import pytest

from bench.overlap import exchange_kind, exchange_stats
from parallel.exchanges import ExchangeRecord


def rec(name, start, end, wait_start, waited):
    return ExchangeRecord(name, nbytes=0, start=start, end=end, waited=waited, wait_start=wait_start)


def test_exchange_kinds():
    assert exchange_kind("layers.3.mlp.dispatch.backward") == "dispatch.backward"
    assert exchange_kind("layers.3.mlp.combine") == "combine"
    assert exchange_kind("layers.3.mlp.counts") == "counts"
    assert exchange_kind("p2p") == "other"


def test_exposed_time_is_split_into_a_late_peer_and_the_link():
    spans = [(0.0, 10.0, "F0.1&BW1.0"), (10.0, 12.0, "F0.2")]       # one F&B action, then a plain forward
    records = [
        # in the F&B: started at 1, the peer started at 3, done at 5; waited 2..6 (1 s of it after completion)
        rec("l.mlp.dispatch", 101.0, 105.0, 102.0, 4.0),
        # in the F&B, a count exchange with no wait at all
        rec("l.mlp.counts", 102.0, 103.0, float("nan"), 0.0),
        # outside: started at 10.5 and waited for from its start; the peer had started before
        rec("l.mlp.combine", 110.5, 111.5, 110.5, 1.0),
    ]
    posted = [103.0, 102.0, 110.0]
    out = exchange_stats(records, posted, 100.0, spans)
    assert out["fb_all_comm"] == pytest.approx(4.0 + 1.0)
    assert out["fb_all_wait"] == pytest.approx(3.0)               # 2..5: the second after completion is no exchange
    assert out["fb_all_late"] == pytest.approx(1.0)               # 2..3: the peer had not started yet
    assert out["fb_all_own"] == pytest.approx(2.0 + 1.0)          # dispatch 3..5, counts 2..3
    assert out["fb_all_ownwait"] == pytest.approx(2.0)            # 3..5
    assert out["fb_payload_comm"] == pytest.approx(4.0)           # counts are not payload
    assert out["fb_dispatch_wait"] == pytest.approx(3.0)
    assert "fb_combine_comm" not in out                           # started outside any F&B action
    assert out["step_all_comm"] == pytest.approx(6.0)
    assert out["step_all_wait"] == pytest.approx(4.0)
    assert out["step_combine_own"] == pytest.approx(1.0)          # the peer was first: all of it is its own time
