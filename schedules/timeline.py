"""Pictures of a step: Chrome trace JSON (Perfetto, chrome://tracing) and a Gantt PNG, plus the measured bubble.

Input, either simulated (`SimResult.timelines`) or measured by the executor:
    timelines[rank] = [(start, end, label), ...]      label: an Action, or its string form ("F3.2", "F0.1&BW7.5")
    comm[rank]      = [(start, end, name), ...]       optional communication spans (waits, transfers)
Times are in seconds for measured traces; simulated ones are in the units of the costs. Spans on one rank
must not overlap (one compute stream per rank).
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence, Union

from .actions import Action

Label = Union[Action, str]
Timelines = Sequence[Sequence[tuple[float, float, Label]]]
CommSpans = Sequence[Sequence[tuple[float, float, str]]]

# colours close to the V3 paper's DualPipe figure: forward orange, backward blue, weight green
COLOURS = {"F": "#f6b26b", "B": "#6fa8dc", "W": "#93c47d", "BW": "#3d85c6", "FB": "#f6b26b"}
_LABEL = re.compile(r"^(FB|BW|F|B|W)(\d+)\.(\d+)")


def _parse(label: Label) -> tuple[str, list[int]]:
    """(op, micro-batch ids) of a label; FB gives both ids, forward first."""
    if isinstance(label, Action):
        return label.op, ([label.mb, label.mb2] if label.op == "FB" else [label.mb])
    halves = str(label).split("&")
    m = _LABEL.match(halves[0])
    if m is None:
        return str(label), []
    if len(halves) == 2:
        m2 = _LABEL.match(halves[1])
        return "FB", [int(m.group(3))] + ([int(m2.group(3))] if m2 else [])
    return m.group(1), [int(m.group(3))]


def _full_backward(label: Label) -> bool:
    return label.full if isinstance(label, Action) else "&BW" in str(label)


def _bounds(timelines: Timelines) -> tuple[float, float]:
    spans = [(s, e) for tl in timelines for s, e, _ in tl]
    if not spans:
        raise ValueError("timelines: no spans on any rank")
    return min(s for s, _ in spans), max(e for _, e in spans)


def measured_bubble(timelines: Timelines) -> list[float]:
    """Per rank: idle time / step time, the step running from the first start to the last end over all ranks."""
    t0, t1 = _bounds(timelines)
    step = t1 - t0
    return [(step - sum(e - s for s, e, _ in tl)) / step for tl in timelines]


def to_chrome_trace(timelines: Timelines, path: str, comm: Optional[CommSpans] = None,
                    time_scale: float = 1e6) -> dict:
    """Write a Chrome trace: process 0 = computation, one thread per rank; process 1 = communication spans.

    `time_scale` converts the timeline's unit to microseconds (1e6 for seconds). Returns the written dict.
    """
    t0, _ = _bounds(timelines)
    events: list[dict] = []
    for r in range(len(timelines)):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
    for r, tl in enumerate(timelines):
        for s, e, label in tl:
            op, mbs = _parse(label)
            events.append({"name": str(label), "cat": op, "ph": "X", "pid": 0, "tid": r,
                           "ts": (s - t0) * time_scale, "dur": (e - s) * time_scale, "args": {"mb": mbs}})
    if comm is not None:
        events.append({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "communication"}})
        for r, spans in enumerate(comm):
            for s, e, name in spans:
                events.append({"name": str(name), "cat": "comm", "ph": "X", "pid": 1, "tid": r,
                               "ts": (s - t0) * time_scale, "dur": (e - s) * time_scale})
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    with open(path, "w") as f:
        json.dump(trace, f)
    return trace


def draw_gantt(timelines: Timelines, path: str, title: str = "", comm: Optional[CommSpans] = None) -> None:
    """One row per rank (rank 0 on top), a box per action coloured by kind with its micro-batch id(s) inside.

    An FB pair is drawn split: forward half on top, backward half below, as in the V3 DualPipe figure.
    Communication spans, if given, are thin grey bars under each row.
    """
    # the object API with an Agg canvas: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    t0, t1 = _bounds(timelines)
    R = len(timelines)
    fig = Figure(figsize=(max(8.0, min(40.0, 0.25 * max(len(tl) for tl in timelines))), 0.5 * R + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8
    for r, tl in enumerate(timelines):
        y = R - 1 - r
        for s, e, label in tl:
            op, mbs = _parse(label)
            x, w = s - t0, e - s
            if op == "FB":
                back = COLOURS["BW" if _full_backward(label) else "B"]
                ax.add_patch(Rectangle((x, y), w, height / 2, facecolor=back, edgecolor="k", linewidth=0.3))
                ax.add_patch(Rectangle((x, y + height / 2), w, height / 2, facecolor=COLOURS["F"],
                                       edgecolor="k", linewidth=0.3))
                for k, mb in enumerate(mbs[:2]):
                    ax.text(x + w / 2, y + height * (0.75 - 0.5 * k), str(mb), ha="center", va="center", fontsize=5)
            else:
                ax.add_patch(Rectangle((x, y), w, height, facecolor=COLOURS.get(op, "#cccccc"),
                                       edgecolor="k", linewidth=0.3))
                if mbs:
                    ax.text(x + w / 2, y + height / 2, str(mbs[0]), ha="center", va="center", fontsize=6)
        if comm is not None and r < len(comm):
            for s, e, _ in comm[r]:
                ax.add_patch(Rectangle((s - t0, y - 0.12), e - s, 0.08, facecolor="#999999", linewidth=0))
    ax.set_xlim(0, t1 - t0)
    ax.set_ylim(-0.3, R)
    ax.set_yticks([R - 1 - r + height / 2 for r in range(R)], [f"rank {r}" for r in range(R)])
    ax.set_xlabel("time")
    if title:
        ax.set_title(title, loc="left")
    ax.legend(handles=[Patch(facecolor=COLOURS[k], label=k) for k in ("F", "B", "W", "BW")],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
