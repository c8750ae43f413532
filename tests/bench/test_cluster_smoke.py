"""bench/cluster.py: the emulated cluster runs the real executor, and what it runs is what simulate() models.

One spawned group of 4 ranks runs the four schedules once with 1 ms units on both emulated devices. Nothing here
depends on timings: the traced actions are simulate()'s, in its order; the nominal cost computed inside each traced
action is exactly the cost simulate() charges for it (so W is deferred where a B runs and the F&B pair costs F&B);
the gradients and losses are those of a float64 single-process computation. On the async device every computation
starts no earlier than simulate() starts it (with the nominal costs and the link), which holds whatever the hosts
did only if every message waits for the end of the action before its SEND and the link. The analysis is checked
on hand-made traces with exact arithmetic.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.cluster import (DEVICES, SCHEDULES, WIDTH, Device, SleepStage, StageCosts, analyse, device_spans, main,
                           micro_batches, nominal_of_spans, overhead_per_action, parse, run_cluster, run_p2p_us,
                           stage_seed, step_bubbles, window)
from schedules import build, get_layout, simulate
from schedules.actions import Action
from schedules.verify import microbatches_of

PP, CHUNKS_PER_PP = 4, 2
COSTS = StageCosts.table(1000)          # F = B = W = 1 ms, F&B pair without W = 1.5 ms
LINK_US = 300                           # the async device's link


@pytest.fixture(scope="module")
def cluster():
    return run_cluster(PP, SCHEDULES, {"table": COSTS}, steps=1, warmup=0, chunks_per_pp=CHUNKS_PER_PP, timeout=120,
                       devices=DEVICES, depth=2, link_us=LINK_US)


def reference(name: str, n: int):
    """float64, one process: every part's weight gradient summed over all micro-batches, and each loss."""
    layout = get_layout(name, PP)
    parts = layout.num_parts
    w = [SleepStage(COSTS, 1000 + p).weight.detach().double().requires_grad_(True) for p in range(parts)]
    losses = {}
    for mb, (x, y) in enumerate(micro_batches(n)):
        h = x[:, :WIDTH].double()
        for p in range(parts):
            h = h * w[p]
        loss = (h * y.double()).sum()
        loss.backward()
        losses[mb] = float(loss.detach())
    return [t.grad for t in w], losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SCHEDULES)
def test_runs_what_simulate_models(cluster, name, device):
    n = CHUNKS_PER_PP * PP
    layout = get_layout(name, PP)
    sim = simulate(build(name, PP, n), layout, COSTS.simulate_costs())
    step = [cluster["records"][r][(device, "table", name)][0] for r in range(PP)]
    for r in range(PP):
        for spans in (step[r]["host_spans"], step[r]["spans"]):
            assert [str(a) for _, _, a in spans] == [str(a) for _, _, a in sim.timelines[r]]
        traced = [a for _, _, a in step[r]["spans"]]
        expected = [int(sim_costs) for sim_costs in (COSTS.simulate_costs().of(a) for a in traced)]
        assert nominal_of_spans(step[r]) == expected, f"rank {r}"
        # every computation was launched inside the traced action it is tagged with (1 ms: the executor's clock
        # and time.time() are read one line apart), none between actions
        for op in step[r]["ops"]:
            s, e, a = step[r]["host_spans"][op[6]]
            assert s - 1e-3 <= op[4] <= e + 1e-3, f"rank {r}: {op[0]} launched outside {a}"
        assert sum(expected) == int(sim.busy[r])
    # gradients: the copies of each part together hold the one-process gradient
    grads, losses = reference(name, n)
    got = [torch.zeros(WIDTH, dtype=torch.float64) for _ in grads]
    for r in range(PP):
        for s, g in step[r]["grads"].items():
            got[layout.stage_to_part[s]] += g.double()
    for p, (a, b) in enumerate(zip(got, grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"part {p}")
    measured = {mb: v for r in range(PP) for mb, v in step[r]["losses"].items()}
    assert sorted(measured) == list(range(n))
    for mb in range(n):
        assert measured[mb] == pytest.approx(losses[mb], rel=1e-5, abs=1e-6)
    # the measured bubble is simulate()'s quantity: makespan - busy, so busy + bubble = makespan on every rank
    makespan, bubbles = step_bubbles(step)
    for r in range(PP):
        if device == "sync":
            busy = sum(e - s for s, e, _ in step[r]["spans"])
        else:                       # the computations themselves: a gap the host left inside an action is bubble
            busy = sum(op[3] - op[2] for op in step[r]["ops"])
            assert busy == pytest.approx(sum(nominal_of_spans(step[r])) / 1e6, abs=1e-6)
        assert busy + bubbles[r] == pytest.approx(makespan, abs=1e-9)
        assert bubbles[r] >= 0


@pytest.mark.parametrize("name", SCHEDULES)
def test_async_device_never_runs_ahead_of_simulate(cluster, name):
    """simulate() with the nominal costs and the link is the async device with hosts that are never late: a host
    can only delay a computation. So, relative to the step's first computation, every computation starts no earlier
    than simulate() starts it; each lasts exactly its cost; a rank's computations never overlap. A message used
    before the end of the action that sent it (plus the link) would start a computation early."""
    n = CHUNKS_PER_PP * PP
    layout = get_layout(name, PP)
    sim = simulate(build(name, PP, n), layout, COSTS.simulate_costs(LINK_US))
    step = [cluster["records"][r][("async", "table", name)][0] for r in range(PP)]
    lo, _ = window(step)
    for r in range(PP):
        ops = step[r]["ops"]
        for kind, us, start, end, launched, late, _ in ops:
            assert end - start == pytest.approx(us / 1e6, abs=1e-6)     # time.time()'s float64 resolution
            assert start >= launched and late >= 0
        assert all(b[2] >= a[3] - 1e-6 for a, b in zip(ops, ops[1:])), f"rank {r}: computations overlap"
        for (s, e, a), (ss, se, sa) in zip(step[r]["spans"], sim.timelines[r]):
            assert str(a) == str(sa)
            # 1 us: times are exact from the step's epoch; adding the epoch back rounds each to time.time()'s 0.24 us
            assert s - lo >= float(ss) / 1e6 - 1e-6, f"rank {r}: {a} started before simulate() allows"
    row = analyse(name, PP, n, [step], COSTS, cluster["p2p_us"], "async", LINK_US)
    assert all(m >= s - 1.0 for m, s in zip(row["measured"], row["sim"]))      # us
    assert row["with_overhead"] is None and row["p2p_us"] == LINK_US


def test_async_device_as_a_stream():
    """The device's own rules, in one process: a computation starts at the latest of its launch, the stream's end
    and its input's readiness (plus the link from another rank), and the host waits once `depth` are pending. Costs
    of 100-200 ms leave the host tens of milliseconds of slack on a loaded machine."""
    import time

    Device.configure("async", depth=2, link_us=10000.0, rank=3)
    try:
        Device.take()
        epoch = time.time()
        Device.begin(epoch)
        e1 = Device.run("F", 200000)                                 # ends 200 ms from now
        x = torch.zeros(1, WIDTH + 2, dtype=torch.float64)
        x[0, WIDTH], x[0, WIDTH + 1] = e1 + 0.05, 1                  # from rank 0, ready 50 ms after e1
        e2 = Device.run("B", 10000, Device.ready(x))                 # starts 50 ms + the 10 ms link after e1
        assert e2 == pytest.approx(e1 + 0.05 + 0.01 + 0.01, abs=1e-9)
        assert Device.host_sleeps == []                              # neither launch waited for the stream
        x[0, WIDTH + 1] = 4                                          # produced on this rank: no link
        assert Device.ready(x) == pytest.approx(e1 + 0.05, abs=1e-9)
        assert Device.ready(torch.zeros(1, WIDTH + 2)) == 0.0        # produced on no device
        assert Device.send_stamp() == e2                             # a SEND posted now leaves after B
        e3 = Device.run("W", 10000)                                  # two pending: waits until the first ended
        assert e3 == pytest.approx(e2 + 0.01, abs=1e-9)
        ops, sleeps = Device.take()
        assert [o[0] for o in ops] == ["F", "B", "W"] and len(sleeps) == 1
        assert ops[2][4] >= epoch + e1 - 1e-6                        # W was launched once F had ended
        assert ops[1][5] == 0.0 and ops[1][2] == pytest.approx(epoch + e1 + 0.06)  # B waited for data, not the host
        Device.synchronize()
        assert time.time() >= epoch + e3
        assert Device.send_stamp() >= e3                             # an idle stream: not before it is posted
        with pytest.raises(ValueError, match="gpu"):
            Device.configure("gpu")
    finally:
        Device.configure("sync")
        Device.take()


def test_p2p_latency_was_measured(cluster):
    assert cluster["p2p_us"] > 0 and math.isfinite(cluster["p2p_us"])
    assert cluster["link_us"] == LINK_US and cluster["depth"] == 2


def test_stage_microbatches_cover_each_part_once():
    # what the gradient check above relies on: every (part, micro-batch) is computed on exactly one stage
    for name in SCHEDULES:
        n, layout = CHUNKS_PER_PP * PP, get_layout(name, PP)
        seen = sorted((layout.stage_to_part[s], mb) for s in range(layout.num_stages)
                      for mb in microbatches_of(layout, s, n))
        assert seen == sorted((p, mb) for p in range(layout.num_parts) for mb in range(n))
        assert {stage_seed(layout, s) for s in range(layout.num_stages)} == {1000 + p for p in range(layout.num_parts)}


def test_analysis_on_a_hand_made_step():
    f, b = Action("F", 0, 0), Action("B", 0, 0)
    # rank 0 computes [0, 2] (slept 1.5) and [3, 4] (slept 1), waits [2, 2.5]; rank 1 computes [1, 5] (slept 3)
    ops0 = [("F", 1500000, 0.25, 1.75, 0.25, 0.0, 0), ("B", 1000000, 3.0, 4.0, 3.0, 0.0, 1)]
    step = [dict(spans=[(0.0, 2.0, f), (3.0, 4.0, b)], waits=[(2.0, 2.5, "wait")], ops=ops0,
                 host_sleeps=[(0.25, 1.75), (3.0, 4.0)]),
            dict(spans=[(1.0, 5.0, f)], waits=[(0.0, 1.0, "wait")], ops=[("F", 3000000, 1.5, 4.5, 1.5, 0.0, 0)],
                 host_sleeps=[(1.5, 4.5)])]
    for r in step:
        r["host_spans"] = r["spans"]
    makespan, bubbles = step_bubbles(step)
    assert makespan == 5.0 and bubbles == [2.0, 1.0]
    o = overhead_per_action(step[0])
    # inside: (3 busy - 2.5 slept) / 2 = 0.25 s; between: (4 span - 3 busy - 0.5 waiting) / 2 = 0.25 s
    assert o["inside"] == pytest.approx(0.25e6) and o["between"] == pytest.approx(0.25e6)
    assert o["total"] == pytest.approx(0.5e6)
    o1 = overhead_per_action(step[1])                 # the wait before its first action is outside its span
    assert o1["inside"] == pytest.approx(1e6) and o1["between"] == pytest.approx(0.0)
    assert nominal_of_spans(step[0]) == [1500000, 1000000]
    # the async device: a traced action's computations are what it launched, wherever the stream ran them
    late = [("B", 500000, 2.5, 3.0, 1.9, 0.5), ("W", 1000000, 3.0, 4.0, 1.95, 0.0), ("F", 1000000, 4.0, 5.0, 3.1, 0.0)]
    late = [op + (i,) for op, i in zip(late, (0, 0, 1))]
    assert device_spans(step[0]["spans"], late) == [(2.5, 4.0, f), (4.0, 5.0, b)]
    assert overhead_per_action(dict(step[0], ops=late, host_sleeps=[]))["late_ms"] == pytest.approx(500.0)


def test_p2p_latency_in_the_run_as_simulate_defines_it():
    # rank 0: F0.0, then SEND_F0.0 and F0.1 then SEND_F0.1; rank 1 receives both
    f00, f01, f10, f11 = Action("F", 0, 0), Action("F", 0, 1), Action("F", 1, 0), Action("F", 1, 1)
    actions = [[f00, Action("SEND_F", 0, 0, peer=1), f01, Action("SEND_F", 0, 1, peer=1)],
               [Action("RECV_F", 0, 0, peer=0), f10, Action("RECV_F", 0, 1, peer=0), f11]]
    step = [dict(spans=[(0.0, 1.0, f00), (1.0, 2.0, f01)], waits=[]),
            # waiting since 0.5 for data posted at 1.0 (the end of F0.0): arrived 1.25 -> 0.25 s; the second wait
            # starts at 2.5, after its data was posted at 2.0: it says nothing about the latency
            dict(spans=[(1.3, 2.3, f10), (2.6, 3.6, f11)],
                 waits=[(0.5, 1.25, "wait RECV_F0.0@0"), (2.5, 2.55, "wait RECV_F0.1@0"), (3.7, 3.8, "wait sends")])]
    us, count = run_p2p_us([step, step], actions)
    assert count == 2 and us == pytest.approx(250000)
    assert run_p2p_us([], actions) == (None, 0)


@pytest.mark.parametrize("argv, key", [(["--pp", "6", "5"], "--pp"), (["--schedules", "gpipe2"], "--schedules"),
                                       (["--costs", "big"], "--costs"), (["--chunks-per-pp", "1"], "--chunks-per-pp"),
                                       (["--unit-ms", "0"], "--unit-ms"), (["--nice", "-21"], "--nice"),
                                       (["--device", "gpu"], "--device"), (["--queue", "0"], "--queue"),
                                       (["--link-us", "-1"], "--link-us"), (["--link-us", "inf"], "--link-us")])
def test_bad_arguments_name_the_argument(argv, key, capsys):
    with pytest.raises(ValueError, match=key):
        parse(argv)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1
