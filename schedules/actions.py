"""The vocabulary every schedule is written in.

A schedule is data: for each rank an ordered list of `Action`s. The same lists are verified (verify.py),
simulated (simulate.py), drawn (timeline.py) and executed (executor.py), so this module has no torch in it.

Stages are *virtual*: a pipeline of `num_stages` stages, each held by exactly one rank (see `Layout`).
- 1F1B / ZB1P / GPipe: num_stages = pp, stage s on rank s.
- DualPipe: two directions of pp stages each; virtual stage v = direction * pp + part. Direction 0 runs part p on
  rank p, direction 1 runs part p on rank pp-1-p, so rank r holds part r and a duplicate of part pp-1-r (V3 §3.2.1).
  Micro-batches 0..N/2-1 enter on rank 0 (direction 0), N/2..N-1 enter on rank pp-1 (direction 1).
- DualPipeV: 2*pp stages in a V: stage v on rank v for v < pp, on rank 2*pp-1-v otherwise; one copy of parameters.

Ops (mb = micro-batch id, global over the step):
  F      forward of (stage, mb)
  B      input-gradient backward of (stage, mb); its weight gradient is deferred to a later W
  W      weight-gradient backward of (stage, mb)
  BW     full backward (input and weight gradients) of (stage, mb)
  FB     an overlapped pair: forward of (stage, mb) with the backward (B) of (stage2, mb2); `full` tells whether
         that backward also computes the weight gradient (BW) or leaves it to a W
  SEND_F / RECV_F   activation of (stage, mb) to / from `peer` (stage is the SENDING stage's id)
  SEND_B / RECV_B   gradient of the input of (stage, mb) to / from `peer` (stage is the SENDING stage's id)
Communication actions are not blocking by themselves: the executor posts consecutive SEND/RECV actions together before
the next computation (on a gloo process group directly, otherwise as one `batch_isend_irecv`) and waits for a RECV
only when the data is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

COMPUTE_OPS = ("F", "B", "W", "BW", "FB")
COMM_OPS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class Action:
    op: str
    stage: int
    mb: int
    peer: Optional[int] = None      # SEND_*/RECV_* only
    stage2: Optional[int] = None    # FB only: the backward half
    mb2: Optional[int] = None       # FB only
    full: bool = False              # FB only: backward half computes weight grads too

    def __post_init__(self):
        if self.op not in COMPUTE_OPS + COMM_OPS:
            raise ValueError(f"Action.op={self.op!r}: allowed {COMPUTE_OPS + COMM_OPS}")
        if (self.op in COMM_OPS) != (self.peer is not None):
            raise ValueError(f"Action.peer={self.peer!r} for op {self.op}: communication ops need a peer, others none")
        if (self.op == "FB") != (self.stage2 is not None and self.mb2 is not None):
            raise ValueError(f"Action {self.op}: stage2/mb2 are set exactly for FB")

    def __str__(self) -> str:  # compact form used in traces and error messages: F3.2 = forward stage 3, mb 2
        if self.op == "FB":
            return f"F{self.stage}.{self.mb}&{'BW' if self.full else 'B'}{self.stage2}.{self.mb2}"
        if self.peer is not None:
            return f"{self.op}{self.stage}.{self.mb}@{self.peer}"
        return f"{self.op}{self.stage}.{self.mb}"


@dataclass(frozen=True)
class Layout:
    """Which rank holds which virtual stage, and where stages sit in the model."""
    pp: int
    num_stages: int
    stage_to_rank: tuple[int, ...]   # virtual stage -> rank
    stage_to_part: tuple[int, ...]   # virtual stage -> model part (DualPipe: both directions run parts 0..pp-1)
    num_parts: int                   # how many model parts the model is cut into

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_rank) if r == rank]

    def next_stage(self, stage: int) -> Optional[int]:
        """The stage that consumes this stage's output, or None for a last stage."""
        nxt = stage + 1
        if nxt >= self.num_stages or self.stage_to_part[nxt] != self.stage_to_part[stage] + 1:
            return None
        return nxt

    def prev_stage(self, stage: int) -> Optional[int]:
        if stage == 0 or self.stage_to_part[stage] == 0:
            return None
        return stage - 1

    def is_first(self, stage: int) -> bool:
        return self.prev_stage(stage) is None

    def is_last(self, stage: int) -> bool:
        return self.next_stage(stage) is None


def linear_layout(pp: int) -> Layout:
    return Layout(pp, pp, tuple(range(pp)), tuple(range(pp)), pp)


def dualpipe_layout(pp: int) -> Layout:
    ranks = tuple(range(pp)) + tuple(pp - 1 - p for p in range(pp))
    parts = tuple(range(pp)) + tuple(range(pp))
    return Layout(pp, 2 * pp, ranks, parts, pp)


def dualpipev_layout(pp: int) -> Layout:
    ranks = tuple(range(pp)) + tuple(2 * pp - 1 - v for v in range(pp, 2 * pp))
    return Layout(pp, 2 * pp, ranks, tuple(range(2 * pp)), 2 * pp)
