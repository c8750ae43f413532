"""Timeline outputs: Chrome trace JSON, Gantt PNG, and the measured bubble against the simulator's."""
import json
from fractions import Fraction as Fr

import pytest

from schedules import Costs, build, get_layout, simulate
from schedules.timeline import _parse, draw_gantt, measured_bubble, to_chrome_trace


@pytest.fixture(scope="module")
def dualpipe_sim():
    return simulate(build("dualpipe", 4, 8), get_layout("dualpipe", 4), Costs.from_table(1, 2, Fr(1, 2), 3))


def test_chrome_trace_events(dualpipe_sim, tmp_path):
    tl = dualpipe_sim.timelines
    comm = [[(s, s + 0.25, f"wait {r}")] for r, rank_tl in enumerate(tl) for s in [rank_tl[0][0]]]
    path = tmp_path / "trace.json"
    to_chrome_trace(tl, str(path), comm=comm, time_scale=1000.0)
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    spans = [e for e in events if e["ph"] == "X" and e["pid"] == 0]
    assert len(spans) == sum(len(t) for t in tl)
    assert len([e for e in events if e["ph"] == "M"]) == len(tl) + 1          # rank names + the comm process
    assert len([e for e in events if e["ph"] == "X" and e["pid"] == 1]) == len(tl)
    for e in spans:
        assert {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"} <= set(e)
    # rank 0's first action is F0.0 at time 0 lasting F = 1 unit = 1000 us
    first = min((e for e in spans if e["tid"] == 0), key=lambda e: e["ts"])
    assert (first["name"], first["cat"], first["ts"], first["dur"], first["args"]["mb"]) == ("F0.0", "F", 0, 1000, [0])
    fb = next(e for e in spans if e["cat"] == "FB")
    assert fb["dur"] == pytest.approx(3000, abs=1e-6) and len(fb["args"]["mb"]) == 2
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(dualpipe_sim.makespan * 1000, abs=1e-6)


def test_gantt_png(dualpipe_sim, tmp_path):
    path = tmp_path / "gantt.png"
    draw_gantt(dualpipe_sim.timelines, str(path), title="DualPipe, 4 ranks, 8 micro-batches")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # measured traces carry string labels and may start at any clock value
    labelled = [[(s + 100.0, e + 100.0, str(a)) for s, e, a in tl] for tl in dualpipe_sim.timelines]
    draw_gantt(labelled, str(tmp_path / "labelled.png"), comm=[[(100.0, 100.5, "recv")]] * 4)
    assert (tmp_path / "labelled.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,pp,n", [("1f1b", 4, 8), ("zb1p", 4, 9), ("dualpipe", 4, 8), ("dualpipev", 2, 6)])
def test_measured_bubble_equals_simulated(name, pp, n):
    res = simulate(build(name, pp, n), get_layout(name, pp), Costs(F=1, B=Fr(3, 2), W=Fr(1, 2), FB=2, p2p=Fr(1, 8)))
    assert measured_bubble(res.timelines) == pytest.approx(res.bubble_ratio, abs=1e-9)
    shifted = [[(s + 7.0, e + 7.0, str(a)) for s, e, a in tl] for tl in res.timelines]
    assert measured_bubble(shifted) == pytest.approx(res.bubble_ratio, abs=1e-9)


def test_string_labels_parse():
    assert _parse("F0.3&BW7.5") == ("FB", [3, 5])
    assert _parse("BW2.11") == ("BW", [11])
    assert _parse("W4.0") == ("W", [0])
    assert _parse("optimizer") == ("optimizer", [])
    with pytest.raises(ValueError, match="timelines"):
        measured_bubble([[], []])
