"""bench/dropin.py's arithmetic on synthetic timings: step time, efficiency round by round, the goals' verdicts, the
weight_grad_split memory table; and its allocation accounting on known allocations.

No processes are spawned: the timings are built by hand, so every expected number is exact arithmetic.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import record_function

from bench.dropin import CONTENDERS, live_bytes, memory_rows, parse, profile_rows, report, round_seconds
from bench.validity import Check


def gathered():
    """3 rounds on 2 ranks. Limit (both ranks at once): 0.6 and 0.8 s -> 0.7 s mean, /2 = 0.35 s per round.
    DualPipe: first start to last end 0.40, 0.35, 0.50 s. DualPipeV: 0.50 s every round; without the weight-gradient
    split 0.56 s. torch DualPipeV: 0.45 s."""
    r0 = {"limit": [(0, 0.6)] * 3, "duet-dualpipe": [(10, 10.3), (20, 20.35), (30, 30.5)],
          "duet-dualpipev": [(40, 40.5)] * 3, "duet-dualpipev-nosplit": [(45, 45.56)] * 3,
          "torch-dualpipev": [(50, 50.45)] * 3, "limit-alone": [(0, 0.5)] * 3}
    r1 = {"limit": [(0, 0.8)] * 3, "duet-dualpipe": [(10.1, 10.4), (20, 20.2), (30.2, 30.4)],
          "duet-dualpipev": [(40, 40.4)] * 3, "duet-dualpipev-nosplit": [(45, 45.5)] * 3,
          "torch-dualpipev": [(50, 50.45)] * 3, "limit-alone": [(0, 0.0)] * 3}
    return [r0, r1]


def test_round_seconds():
    g = gathered()
    assert round_seconds(g, "limit") == pytest.approx([0.7] * 3)
    assert round_seconds(g, "limit-alone") == pytest.approx([0.5] * 3)        # rank 0 only: rank 1 idled
    assert round_seconds(g, "duet-dualpipe") == pytest.approx([0.4, 0.35, 0.5])


def test_report_efficiency_and_goals():
    a = parse(["--rounds", "3"])
    text = report(a, gathered(), [Check("x", "0%", "< 5%", True)], (0.1, 0.2))
    # DualPipe: 0.35 / [0.4, 0.35, 0.5] = [0.875, 1.0, 0.7]: median 0.875 (0.35 / 0.4 rounds below it in floating point); p25-p75 of those three: 0.70 - 1.00
    assert "| duet DualPipe | 400.0 | 350.0 - 500.0 | 350.0 - 500.0 | 0.87 (0.70 - 1.00) | 0.62 |" in text
    assert "duet DualPipe: efficiency 0.87 (goal >= 0.85): met" in text
    # DualPipeV 0.35 / 0.5 = 0.70 < 0.80; slower than torch's (0.50 / 0.45 > 1)
    assert "duet DualPipeV: efficiency 0.70 (goal >= 0.80): NOT met" in text
    assert "no, slower than torch ScheduleDualPipeV" in text
    # the reference library's timing is a row of its own (0.35 / 0.56 = 0.625), with no goal
    assert "| duet DualPipeV, weight_grad_split=False (the reference's timing) | 560.0 | 560.0 - 560.0 | " \
           "560.0 - 560.0 | 0.62 (0.62 - 0.62) |" in text
    assert text.count("(goal >=") == 2
    assert "not valid" not in text
    bad = report(a, gathered(), [Check("x", "9%", "< 5%", False)], (0.1, 0.2))
    assert "**The run is not valid**: x = 9% (allowed < 5%)" in bad


def test_profile_rows():
    g = [{"profile:duet-dualpipe": [dict(wall=0.5, optimizer=0.02, compute={"F": 0.1, "FB": 0.2}, waits=0.05,
                                         post=0.01, main_cpu=0.4, other_threads_cpu=0.03)]}] * 2
    rows = profile_rows(g, [0.6, 0.6])
    # compute 0.3 s vs the same work in one process 0.6 / 2: 1.00; rest = 0.5 - 0.3 - 0.05 - 0.01 - 0.02 = 0.12
    assert "| duet DualPipe | 0 | 500.0 | 300.0 (100 / 0 / 0 / 200 / 0) | 1.00 | 50.0 | 10.0 | 20.0 | 120.0 | " \
           "400.0 | 30.0 |" in rows


def test_contenders():
    """The duet rows run the drop-in's default (weight_grad_split=True); one row keeps the reference's timing."""
    duet = [k for k in CONTENDERS if k.startswith("duet-")]
    assert duet == ["duet-dualpipe", "duet-dualpipev", "duet-dualpipev-nosplit"]
    assert parse(["--only", "duet-dualpipev-nosplit"]).only == ["duet-dualpipev-nosplit"]


def test_memory_rows():
    mib = 2 ** 20
    g = [{"memory": {"dualpipe": dict(peak_split=46 * mib, peak_nosplit=46 * mib, held_for_w=9.75 * mib, bitwise=True),
                     "dualpipev": dict(peak_split=34 * mib, peak_nosplit=33.5 * mib, held_for_w=5 * mib,
                                       bitwise=False)}}] * 2
    rows = memory_rows(g)
    assert "| duet DualPipe | 1 | 46.00 | 46.00 | 9.75 | bitwise equal |" in rows
    assert "| duet DualPipeV | 0 | 33.50 | 34.00 | 5.00 | DIFFER |" in rows
    assert memory_rows([{}]) == []


def test_live_bytes_on_known_allocations():
    """1 MiB held, then 3 MiB more inside a marked range and freed, twice: peak 4 MiB, 1 MiB live at each mark."""
    mib = 2 ** 20

    def work():
        held = torch.empty(mib, dtype=torch.uint8)
        for _ in range(2):
            with record_function("mark"):
                tmp = torch.empty(3 * mib, dtype=torch.uint8)
                del tmp
        return held.numel()

    peak, at_marks, result = live_bytes(work, "mark")
    assert (peak, at_marks, result) == (4 * mib, [mib, mib], mib)


def test_bad_arguments():
    with pytest.raises(SystemExit):
        parse(["--nice", "40"])
    with pytest.raises(SystemExit):
        parse(["--only", "megatron-1f1b"])
    with pytest.raises(ValueError, match="optimizer='lion'"):
        from bench._pipeline_peers import make_optimizer
        make_optimizer("lion", [], 0.1)
