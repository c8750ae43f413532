"""bench/validity.py: the readings a benchmark report is judged by, on scripted /proc/stat values."""
import os

import pytest

from bench import validity as V


def test_steal_and_busy_from_proc_stat_deltas(monkeypatch):
    #          user nice system idle iowait irq softirq steal
    before = [1000, 0, 200, 5000, 10, 0, 5, 100]
    after = [1600, 0, 300, 5300, 10, 0, 5, 150]        # +600 +100 +300 idle +50 steal: 1050 jiffies in all
    assert V.steal_fraction(before, after) == pytest.approx(50 / 1050)
    monkeypatch.setattr(os, "sysconf", lambda name: 100)  # CLK_TCK
    assert V.busy_seconds(after) - V.busy_seconds(before) == pytest.approx(7.0)
    assert V.steal_fraction(None, after) is None
    assert V.no_steal(before, after).ok and not V.no_steal(before, after, limit=0.04).ok


def test_others_subtracts_our_own_cpu_time(monkeypatch):
    readings = iter([[0, 0, 0, 0, 0, 0, 0, 0], [300, 0, 100, 0, 0, 0, 0, 0]])   # 4 s busy (CLK_TCK 100)
    own = iter([10.0, 13.0])                                                   # of which 3 s ours
    clock = iter([0.0, 10.0])                                                  # over 10 s of wall time
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(V, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(V, "own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(V.time, "perf_counter", lambda: next(clock))
    c = V.Others().check(limit=0.06)
    assert (c.value, c.ok) == ("5.0%", True)                                   # 1 s of 20 core-seconds


def test_verdict_names_every_failed_check():
    checks = [V.Check("a", "1", "< 2", True), V.Check("b", "3", "< 2", False), V.Check("c", "9 us", "< 5 us", False)]
    assert V.verdict(checks) == (False, "b = 3 (allowed < 2); c = 9 us (allowed < 5 us)")
    assert V.verdict(checks[:1]) == (True, "")
    table = V.checks_table(checks).splitlines()
    assert len(table) == 5 and table[3] == "| b | 3 | < 2 | FAILED |"


def test_median_time_and_sleep_overshoot_shapes():
    calls = []
    assert V.median_time(lambda: calls.append(1), n=5, warmup=2) >= 0 and len(calls) == 7
    med, p90 = V.sleep_overshoot_us(0.0005, n=5)
    assert med <= p90
