"""Discrete-event timing of a schedule from per-action costs: timelines, bubble and activation memory.

Each rank runs its compute actions in list order. An action starts when its rank is free and its inputs are
there: data from another rank arrives `p2p` after the SEND that carries it is posted, and a SEND is posted when
its rank reaches it in its list, i.e. when the compute action before it ends (sends never block). Data from a
stage on the same rank is there as soon as it is computed. Time is kept in exact fractions, so bubble formulas
can be compared exactly; the result is given in floats (and exact fractions where it matters).

Costs are per action and uniform over stages. Note the two notations: here B is the input-gradient backward
and BW = B + W the full one, whereas V3 Table 2 writes B for the full backward and F&B for an overlapped pair
with a full backward; `Costs.from_table` converts.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from numbers import Real
from typing import Optional

from .actions import COMM_OPS, Action, Layout
from .verify import peak_activations


@dataclass(frozen=True)
class Costs:
    """Time of one action on one stage.

    F: forward. B: input-gradient backward. W: weight-gradient backward. BW: full backward (default B + W).
    FB: a forward overlapped with an input-gradient backward (default F + B, i.e. no overlap gain); an FB pair
    whose backward half is full (`Action.full`, as DualPipe's) also pays W: FB + W.
    p2p: latency of one point-to-point message.
    """
    F: Real
    B: Real
    W: Real
    FB: Optional[Real] = None
    BW: Optional[Real] = None
    p2p: Real = 0.0

    def __post_init__(self):
        for name in ("F", "B", "W", "FB", "BW", "p2p"):
            v = getattr(self, name)
            if v is None and name in ("FB", "BW"):
                continue
            if isinstance(v, bool) or not isinstance(v, Real) or v < 0:
                raise ValueError(f"Costs.{name}={v!r}: must be a number >= 0")

    @classmethod
    def from_table(cls, F: Real, B: Real, W: Real, FB: Optional[Real] = None, p2p: Real = 0.0) -> "Costs":
        """V3 Table 2 notation: B = full backward, FB = F&B, a forward overlapped with a full backward."""
        if B < W:
            raise ValueError(f"B={B!r}: the full backward cannot be shorter than its weight part W={W!r}")
        if FB is not None and FB < W:
            raise ValueError(f"FB={FB!r}: must be >= W={W!r}")
        # exact differences, so that B + W gives back the full backward without rounding
        B_input = Fraction(B) - Fraction(W)
        FB_input = None if FB is None else Fraction(FB) - Fraction(W)
        return cls(F=F, B=B_input, W=W, BW=B, FB=FB_input, p2p=p2p)

    def exact(self, name: str) -> Fraction:
        v = getattr(self, name)
        if v is None:
            if name == "BW":
                return self.exact("B") + self.exact("W")
            return self.exact("F") + self.exact("B")   # FB
        return Fraction(v)

    def of(self, action: Action) -> Fraction:
        if action.op == "FB":
            return self.exact("FB") + (self.exact("W") if action.full else 0)
        if action.op in COMM_OPS:
            return Fraction(0)
        return self.exact(action.op)


@dataclass
class SimResult:
    timelines: list[list[tuple[float, float, Action]]]   # per rank: (start, end, action) of each compute action
    makespan: float
    busy: list[float]
    bubble: list[float]              # per rank: makespan - busy
    bubble_ratio: list[float]        # per rank: bubble / makespan
    peak_activations: list[int]
    bubble_exact: list[Fraction]
    makespan_exact: Fraction


def simulate(actions_per_rank: list[list[Action]], layout: Layout, costs: Costs) -> SimResult:
    R = layout.pp
    if len(actions_per_rank) != R:
        raise ValueError(f"actions_per_rank has {len(actions_per_rank)} lists: the layout has pp={R}")
    p2p = costs.exact("p2p")

    # per rank: the compute actions, and for each SEND the compute action whose end posts it
    computes: list[list[Action]] = []
    posted_after: dict[tuple[str, int, int], tuple[int, int]] = {}   # (kind, stage, mb) -> (rank, compute index)
    for r, acts in enumerate(actions_per_rank):
        comp: list[Action] = []
        for a in acts:
            if a.op in ("SEND_F", "SEND_B"):
                posted_after[(a.op[-1], a.stage, a.mb)] = (r, len(comp) - 1)
            elif a.op not in COMM_OPS:
                comp.append(a)
        computes.append(comp)

    starts: list[list[Optional[Fraction]]] = [[None] * len(c) for c in computes]
    ends: list[list[Optional[Fraction]]] = [[None] * len(c) for c in computes]
    f_end: dict[tuple[int, int], Fraction] = {}   # (stage, mb) -> end of its forward
    b_end: dict[tuple[int, int], Fraction] = {}   # (stage, mb) -> end of its input-gradient backward

    def arrival(kind: str, src_stage: int, mb: int, rank: int) -> Optional[Fraction]:
        """When the output of (src_stage, mb) is usable on `rank`, or None if not known yet."""
        if layout.stage_to_rank[src_stage] == rank:
            return (f_end if kind == "F" else b_end).get((src_stage, mb))
        key = (kind, src_stage, mb)
        if key not in posted_after:
            raise ValueError(f"rank {rank} needs {kind} data of stage {src_stage} mb {mb} that is never sent "
                             f"(run schedules.verify for details)")
        src, idx = posted_after[key]
        if idx < 0:
            raise ValueError(f"SEND_{kind}{src_stage}.{mb} on rank {src} comes before any computation")
        posted = ends[src][idx]
        return None if posted is None else posted + p2p

    def ready(a: Action, rank: int) -> Optional[Fraction]:
        t = Fraction(0)
        if a.op in ("F", "FB"):
            prev = layout.prev_stage(a.stage)
            if prev is not None:
                got = arrival("F", prev, a.mb, rank)
                if got is None:
                    return None
                t = max(t, got)
        halves = [(a.stage, a.mb)] if a.op in ("B", "BW") else [(a.stage2, a.mb2)] if a.op == "FB" else []
        for stage, mb in halves:
            nxt = layout.next_stage(stage)
            if nxt is not None:
                got = arrival("B", nxt, mb, rank)
                if got is None:
                    return None
                t = max(t, got)
        return t   # W and the local forward before a backward are earlier on this rank: no extra wait

    cursor = [0] * R
    free = [Fraction(0)] * R
    remaining = sum(len(c) for c in computes)
    while remaining:
        progress = False
        for r in range(R):
            while cursor[r] < len(computes[r]):
                a = computes[r][cursor[r]]
                t = ready(a, r)
                if t is None:
                    break
                start = max(free[r], t)
                end = start + costs.of(a)
                starts[r][cursor[r]], ends[r][cursor[r]] = start, end
                if a.op in ("F", "FB"):
                    f_end[(a.stage, a.mb)] = end
                if a.op in ("B", "BW"):
                    b_end[(a.stage, a.mb)] = end
                if a.op == "FB":
                    b_end[(a.stage2, a.mb2)] = end
                free[r] = end
                cursor[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = ", ".join(f"rank {r} at {computes[r][cursor[r]]}" for r in range(R) if cursor[r] < len(computes[r]))
            raise ValueError(f"the schedule deadlocks ({stuck}); run schedules.verify for details")

    timelines_exact = [[(starts[r][i], ends[r][i], a) for i, a in enumerate(computes[r])]
                       for r in range(R)]
    makespan = max((tl[-1][1] for tl in timelines_exact if tl), default=Fraction(0))
    busy = [sum((e - s for s, e, _ in tl), Fraction(0)) for tl in timelines_exact]
    bubble = [makespan - b for b in busy]
    return SimResult(
        timelines=[[(float(s), float(e), a) for s, e, a in tl] for tl in timelines_exact],
        makespan=float(makespan),
        busy=[float(b) for b in busy],
        bubble=[float(b) for b in bubble],
        bubble_ratio=[float(b / makespan) if makespan else 0.0 for b in bubble],
        peak_activations=[peak_activations(acts) for acts in actions_per_rank],
        bubble_exact=bubble,
        makespan_exact=makespan,
    )


# ---- the DualPipe README / V3 Table 2 columns ----

def table_pp(name: str, pp: int) -> int:
    """The table's PP for a schedule run on `pp` devices: DualPipeV cuts the model into 2*pp stages on pp devices."""
    return 2 * pp if name == "dualpipev" else pp


def bubble_table(name: str, pp: int, costs: Costs) -> float:
    """The table's bubble formula, with B = full backward (costs.BW) and F&B = a full overlapped pair."""
    F, W, Bfull = costs.exact("F"), costs.exact("W"), costs.exact("BW")
    FandB = costs.exact("FB") + W
    P = table_pp(name, pp)
    if name in ("gpipe", "1f1b"):
        return float((P - 1) * (F + Bfull))
    if name == "zb1p":
        return float((P - 1) * (F + Bfull - 2 * W))
    if name in ("dualpipe", "dualpipev"):
        return float((Fraction(P, 2) - 1) * (FandB + Bfull - 3 * W))
    raise ValueError(f"name={name!r}: allowed ['gpipe', '1f1b', 'zb1p', 'dualpipe', 'dualpipev']")


def parameters_per_device(name: str, layout: Layout) -> Fraction:
    """Parameters one device holds, in units of 1/PP of the model (the table's "1x", "2x"), PP as in `table_pp`."""
    stages = max(len(layout.stages_of(r)) for r in range(layout.pp))
    return Fraction(stages * table_pp(name, layout.pp), layout.num_parts)
