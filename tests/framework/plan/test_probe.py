"""The cpu probe (framework/plan/probe.py) in two real processes: its figures, and the executor's time per action
that, put back into simulate() with the measured latency, lasts as long as the measured DualPipe step."""
from __future__ import annotations

import pytest

from framework.plan.probe import measure


def test_two_processes_measure_together_and_the_action_time_reproduces_their_step():
    from schedules import build, get_layout
    from schedules.simulate import Costs, simulate

    m = measure(2, shapes=[(64, 32, 16)])
    for key in ("flops", "hbm", "op_s", "p2p_latency_s", "p2p_bytes_s", "pipeline_step_s", "allreduce_s"):
        assert m[key] > 0, key
    (shape, *passes), = m["gemm_table"]          # the listed linear, in its forward and two backward GEMMs
    assert shape == (64, 32, 16) and min(passes) > 0
    h, lat = m["action_s"], m["p2p_latency_s"]
    step = simulate(build("dualpipe", 2, 4), get_layout("dualpipe", 2), Costs(F=h, B=h, W=h, FB=h, p2p=lat)).makespan
    if h > 0:
        assert step == pytest.approx(m["pipeline_step_s"], rel=1e-6)
    else:   # the messages alone outlast the step: nothing is left for the executor
        assert step >= m["pipeline_step_s"]
