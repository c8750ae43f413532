"""Simulated timing against the DualPipe README / V3 Table 2 and the exact values of the reference schedules.

Notation of V3's Table 2: B = full backward, F&B = a forward overlapped with a full
backward; `Costs.from_table` takes that notation. Zero communication latency unless said otherwise.
"""
from fractions import Fraction as Fr

import pytest

from schedules import Action, Costs, build, get_layout, simulate
from schedules.simulate import bubble_table, parameters_per_device

PPS = (4, 8, 16)


def _sim(name, pp, n, costs):
    return simulate(build(name, pp, n), get_layout(name, pp), costs)


def test_exact_timeline_1f1b_two_ranks():
    # pp=2, 2 micro-batches, F=1, full backward 2: worked out by hand
    res = _sim("1f1b", 2, 2, Costs(F=1, B=Fr(3, 2), W=Fr(1, 2)))
    got = [[(s, e, str(a)) for s, e, a in tl] for tl in res.timelines]
    assert got == [
        [(0, 1, "F0.0"), (1, 2, "F0.1"), (4, 6, "BW0.0"), (7, 9, "BW0.1")],
        [(1, 2, "F1.0"), (2, 4, "BW1.0"), (4, 5, "F1.1"), (5, 7, "BW1.1")],
    ]
    assert res.makespan == 9 and res.busy == [6, 6] and res.bubble == [3, 3]
    assert res.bubble_ratio == [pytest.approx(1 / 3, abs=1e-12)] * 2


@pytest.mark.parametrize("F,Bfull,W", [(1, 2, 1), (1, 2, Fr(1, 2)), (Fr(3, 10), Fr(7, 10), Fr(1, 10)), (3, 1, 1)])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b(F, Bfull, W):
    for pp in PPS:
        for n in (pp, 2 * pp, 3 * pp + 1):
            res = _sim("1f1b", pp, n, Costs.from_table(F, Bfull, W))
            assert res.bubble_exact == [(pp - 1) * (F + Bfull)] * pp, (pp, n)
            assert bubble_table("1f1b", pp, Costs.from_table(F, Bfull, W)) == pytest.approx(
                float((pp - 1) * (F + Bfull)), abs=1e-9)
            assert res.peak_activations == [pp - r for r in range(pp)]


@pytest.mark.parametrize("F,Bfull,W", [
    (1, 2, 1), (1, 2, Fr(1, 2)), (Fr(3, 2), 2, Fr(1, 2)), (1, 3, Fr(1, 4)),
    (1, 2, Fr(3, 2)),          # W > F: bounded by F
    (1, 4, Fr(3, 2)),          # W > F and B - W > F: bounded by B - W
    (Fr(1, 2), 2, 0),
])
def test_zb1p_bubble_exact_form(F, Bfull, W):
    costs = Costs.from_table(F, Bfull, W)
    for pp in PPS:
        exact = (pp - 1) * max(F + Bfull - 2 * W, F, Bfull - W)
        for n in (pp, 2 * pp + 1, 3 * pp):
            res = _sim("zb1p", pp, n, costs)
            assert res.bubble_exact == [exact] * pp, (pp, n)
        table = bubble_table("zb1p", pp, costs)
        if W <= F and W <= Bfull - W:       # the regime where the table is exact
            assert table == pytest.approx(float(exact), abs=1e-9)
        assert max(res.peak_activations) == pp


def _dualpipe_expected(pp, F, Bfull, W, FB):
    """Per-rank bubble in the regime B - W = F, W <= F: the table, minus the overlap gain near the ends."""
    table = (Fr(pp, 2) - 1) * (FB + Bfull - 3 * W)
    return table, [table - max(0, pp // 2 - 2 - min(r, pp - 1 - r)) * (F + Bfull - FB) for r in range(pp)]


@pytest.mark.parametrize("F,W,FB", [
    (1, 1, 2), (1, 1, Fr(5, 2)), (1, 1, 3),                 # F=1, B=2, W=1, F&B anywhere in [max(F,B), F+B]
    (Fr(3, 2), Fr(1, 2), Fr(5, 2)), (2, 1, 4), (2, 2, 5),
])
def test_dualpipe_worst_rank_equals_table_when_b_minus_w_equals_f(F, W, FB):
    Bfull = F + W
    costs = Costs.from_table(F, Bfull, W, FB)
    for pp in PPS:
        table, per_rank = _dualpipe_expected(pp, F, Bfull, W, FB)
        assert bubble_table("dualpipe", pp, costs) == pytest.approx(float(table), abs=1e-9)
        for n in (2 * pp, 2 * pp + 2, 3 * pp):              # the bubble does not depend on the chunk count
            res = _sim("dualpipe", pp, n, costs)
            assert res.bubble_exact == per_rank, (pp, n)
            assert max(res.bubble_exact) == table


def test_dualpipe_off_the_regime():
    # PP=8, F=1, B=2, W=0.5, F&B=3 gives 9.5 on every rank, against the table's 10.5 (B-W > F: below)
    costs = Costs.from_table(1, 2, Fr(1, 2), 3)
    res = _sim("dualpipe", 8, 16, costs)
    assert res.bubble_exact == [Fr(19, 2)] * 8
    assert bubble_table("dualpipe", 8, costs) == pytest.approx(10.5, abs=1e-9)
    # B - W < F: above the table
    costs = Costs.from_table(2, 2, Fr(1, 2), 3)
    res = _sim("dualpipe", 8, 16, costs)
    assert max(res.bubble_exact) > Fr(bubble_table("dualpipe", 8, costs))


@pytest.mark.parametrize("costs", [Costs.from_table(1, 2, 1, 2), Costs.from_table(1, 2, Fr(1, 2), 3),
                                   Costs.from_table(2, 3, Fr(1, 2), 4)])
def test_dualpipev_on_r_devices_times_like_dualpipe_on_2r(costs):
    for R in (2, 4, 8):
        for n in (2 * R, 3 * R + 1, 4 * R):
            v = _sim("dualpipev", R, n, costs)
            d = _sim("dualpipe", 2 * R, 2 * n, costs)
            assert v.makespan_exact == d.makespan_exact, (R, n)
            assert v.bubble_exact == d.bubble_exact[:R], (R, n)
        # table: PP = 2R stages on R devices
        assert bubble_table("dualpipev", R, costs) == bubble_table("dualpipe", 2 * R, costs)


def test_activation_and_parameter_columns_of_the_table():
    for pp in PPS:
        dp = _sim("dualpipe", pp, 2 * pp, Costs(1, 1, 1))
        assert dp.peak_activations == [pp + 1 if r in (pp // 2 - 1, pp // 2) else pp for r in range(pp)]
        R = pp // 2                       # DualPipeV: table PP = 2R stages on R devices
        dv = _sim("dualpipev", R, 2 * R, Costs(1, 1, 1))
        assert dv.peak_activations[-1] == 2 * R + 1 == max(dv.peak_activations)
        expect_params = {"1f1b": 1, "zb1p": 1, "gpipe": 1, "dualpipe": 2, "dualpipev": 2}
        for name, x in expect_params.items():
            p = R if name == "dualpipev" else pp
            assert parameters_per_device(name, get_layout(name, p)) == x


def test_gpipe_with_latency():
    # all forwards then all backwards: the first micro-batch crosses pp-1 links each way
    c = Fr(1, 10)
    for pp in PPS:
        res = _sim("gpipe", pp, 2 * pp, Costs(F=1, B=Fr(3, 2), W=Fr(1, 2), p2p=c))
        assert res.bubble_exact == [(pp - 1) * (1 + 2 + 2 * c)] * pp
        assert res.peak_activations == [2 * pp] * pp


def test_cost_rules_and_bad_costs():
    c = Costs(F=1, B=2, W=Fr(1, 2))
    assert c.of(Action("BW", 0, 0)) == Fr(5, 2)
    assert c.of(Action("FB", 0, 0, stage2=1, mb2=0)) == 3
    assert c.of(Action("FB", 0, 0, stage2=1, mb2=0, full=True)) == Fr(7, 2)
    assert c.of(Action("SEND_F", 0, 0, peer=1)) == 0
    t = Costs.from_table(1, 2, Fr(1, 2), 3)         # full backward 2, F&B (full) 3
    assert (t.exact("B"), t.exact("BW"), t.of(Action("FB", 0, 0, stage2=1, mb2=0, full=True))) == (Fr(3, 2), 2, 3)
    with pytest.raises(ValueError, match="Costs.W=-1"):
        Costs(F=1, B=1, W=-1)
    with pytest.raises(ValueError, match="B=1"):
        Costs.from_table(1, 1, 2)
    with pytest.raises(ValueError, match="name='x'"):
        bubble_table("x", 4, c)
