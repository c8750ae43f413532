"""bench/pipeline.py's analysis on synthetic traces: step time, bubble, per-action costs and the simulator rows.

No processes are spawned: the records are built by hand, so every expected number is exact arithmetic.
"""
from __future__ import annotations

import pytest

from bench.pipeline import (action_costs, first_loss, paired_ratio, parse, pooled_costs, simulate_rows, step_stats,
                            steps_of, to_costs)
from schedules.actions import Action


def rec(t0, t1, spans, warm=False, loss_sum=0.0, count=0, opt_s=0.0):
    return dict(t0=t0, t1=t1, opt_s=opt_s, spans=spans, comm=[], loss_sum=loss_sum, count=count, warm=warm)


def two_rank_records(name="c"):
    """3 timed steps (plus one warm-up) of a 2-rank contender.

    Each timed step: rank 0 computes [0, 2] and [3, 4], rank 1 computes [1, 4]; window [0, 4] so the bubbles are
    1/4 (rank 0) and 1/4 (rank 1); the step runs from 0 to 5 (optimizer after the window).
    """
    r0, r1 = [rec(100.0, 101.0, [(100.0, 101.0, "F0.0")], warm=True, loss_sum=6.0, count=2)], \
             [rec(100.0, 101.0, [(100.0, 101.0, "F1.0")], warm=True, loss_sum=3.0, count=1)]
    for k, base in enumerate((10.0, 20.0, 30.0)):
        r0.append(rec(base, base + 5.0, [(base, base + 2, "F0.0"), (base + 3, base + 4, "BW0.0")], opt_s=0.5 + k))
        r1.append(rec(base, base + 4.5 + k, [(base + 1, base + 4, "F1.0")], opt_s=0.25))
    return [{name: r0}, {name: r1}]


def test_steps_and_stats():
    records = two_rank_records()
    steps = steps_of(records, "c")
    assert len(steps) == 3 and all(len(s) == 2 for s in steps)       # the warm-up step is left out
    st = step_stats(steps)
    assert st["step_s"] == pytest.approx(5.5)                        # steps 5, 5.5, 6.5: median 5.5
    assert st["window_s"] == pytest.approx(4.0)
    assert st["fastest_s"] == pytest.approx(5.0)
    assert st["post_s"] == pytest.approx(1.5)                        # optimizer, max over ranks: 0.5, 1.5, 2.5
    assert st["bubble"] == pytest.approx([0.25, 0.25])
    assert st["bubble_s"] == pytest.approx([1.0, 1.0])
    assert st["median_step"] == 1


def test_paired_ratio_is_the_median_of_per_round_ratios():
    records = two_rank_records("c")
    ref = two_rank_records("ref")
    for r, rr in zip(records, ref):
        r.update(rr)
        for k, rec_ in enumerate(r["ref"][1:]):      # the reference's timed steps last 5, 10 and 2.5 s
            rec_["t1"] = rec_["t0"] + (5.0, 10.0, 2.5)[k]
    # this contender's steps: 5, 5.5, 6.5 -> ratios 1.0, 0.55, 2.6 -> median 1.0
    assert paired_ratio(records, "c", "ref") == pytest.approx(1.0)


def test_first_loss_is_the_mean_over_all_micro_batches():
    # the first (warm-up) step: rank 0 reports 6.0 over 2 micro-batches, rank 1 3.0 over 1
    assert first_loss(two_rank_records(), "c") == pytest.approx(3.0)
    assert first_loss([{}, {}], "c") is None


def test_action_costs_and_simulator_costs():
    fb = Action("FB", 0, 1, stage2=3, mb2=0, full=True)
    spans = [(0.0, 0.002, Action("F", 0, 0)), (0.002, 0.0045, Action("F", 0, 1)),
             (0.010, 0.011, Action("B", 0, 0)), (0.011, 0.0125, Action("W", 0, 0)),
             (0.020, 0.024, Action("BW", 0, 1)), (0.030, 0.036, fb), (0.040, 0.042, Action("F", 0, 2))]
    steps = [[rec(0, 1, spans), rec(0, 1, [])]]
    c = action_costs(steps)
    assert c == pytest.approx({"F": 0.002, "B": 0.001, "W": 0.0015, "BW": 0.004, "FB": 0.006})
    costs = to_costs(c, p2p_s=0.0002)
    # integer microseconds; simulate's FB is the pair without its weight gradient
    assert (costs.F, costs.B, costs.W, costs.BW, costs.FB, costs.p2p) == (2000, 1000, 1500, 4000, 4500, 200)
    # pooling two contenders' records takes the median over both: F = 2, 2.5, 2 and 4 ms -> 2.25 ms
    both = [{"a": [steps[0][0]], "b": [rec(0, 1, [(0.0, 0.004, Action("F", 0, 0))])]},
            {"a": [steps[0][1]], "b": [rec(0, 1, [])]}]
    assert pooled_costs(both, ["a", "b"])["F"] == pytest.approx(0.00225)


@pytest.mark.parametrize("pp", [2, 8])
def test_simulated_rows_against_the_table(pp):
    # F = 1 ms, full backward 2 ms of which W = 1 ms, F&B (full) = 3 ms: B - W = F and W <= F, the regime where
    # the table is exact for DualPipe's worst rank; 1F1B's (PP-1)(F+B) is exact for any costs
    costs = to_costs({"F": 0.001, "B": 0.001, "W": 0.001, "BW": 0.002, "FB": 0.003})
    one = simulate_rows("1f1b", pp, 4 * pp, costs)
    assert one["bubble"][one["worst"]] == pytest.approx((pp - 1) * 0.003)
    assert one["table"] == pytest.approx((pp - 1) * 0.003)
    dual = simulate_rows("dualpipe", pp, 4 * pp, costs)
    assert dual["table"] == pytest.approx((pp // 2 - 1) * (0.003 + 0.002 - 0.003))
    assert dual["bubble"][dual["worst"]] == pytest.approx(dual["table"])
    assert dual["ratio"][dual["worst"]] == pytest.approx(dual["bubble"][dual["worst"]] / dual["makespan"])


@pytest.mark.parametrize("argv, key", [(["--blocks", "6"], "--blocks"), (["--microbatches", "5"], "--microbatches"),
                                       (["--steps", "0"], "--steps")])
def test_bad_arguments_name_the_argument(argv, key):
    with pytest.raises(ValueError, match=key):
        parse(argv)
