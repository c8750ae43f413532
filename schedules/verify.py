"""Check a schedule before anything runs it: replay every rank's list together, event by event.

Model of communication (what the executor does): SEND is non-blocking and may be posted once its data exists;
RECV is posted without waiting and completes once the matching SEND has been posted; a compute action waits
for the RECVs it needs, which must have been posted earlier in the same list. If every unfinished rank waits on
something no other rank can still provide, the schedule deadlocks and `verify` says who waits on what.

What "complete" means: every (stage, mb) a stage owns gets exactly one F and either one BW or one B and one W
(FB counts as its F and its backward half). Stage s of direction d owns micro-batches d*N/D .. (d+1)*N/D-1 where
D = num_stages / num_parts directions (DualPipe: 2, others: 1).
"""
from __future__ import annotations

from dataclasses import dataclass

from .actions import COMM_OPS, Action, Layout


class ScheduleError(ValueError):
    """The action lists are not a valid schedule; the message names the rank, the action and the reason."""


@dataclass
class Report:
    peak_activations: list[int]   # per rank: most (stage, mb) whose F ran and whose W/BW has not
    compute_actions: list[int]    # per rank: F, B, W, BW, FB actions (an FB pair counts once)
    comm_actions: list[int]       # per rank: SEND_*/RECV_* actions


def microbatches_of(layout: Layout, stage: int, num_microbatches: int) -> range:
    """The micro-batches that flow through `stage` (DualPipe splits them between its two directions)."""
    directions = layout.num_stages // layout.num_parts
    per_direction = num_microbatches // directions
    d = stage // layout.num_parts
    return range(d * per_direction, (d + 1) * per_direction)


def peak_activations(actions: list[Action]) -> int:
    """Most (stage, mb) alive on one rank between two actions: alive from its F until its W or full backward.

    Counted at action boundaries, so an FB pair whose backward half is full swaps one micro-batch for another
    (V3 Table 2 counts DualPipe's activations this way: PP on the outer ranks, PP+1 on the middle ones).
    """
    alive: set[tuple[int, int]] = set()
    peak = 0
    for a in actions:
        if a.op in ("F", "FB"):
            alive.add((a.stage, a.mb))
        if a.op in ("W", "BW"):
            alive.discard((a.stage, a.mb))
        if a.op == "FB" and a.full:
            alive.discard((a.stage2, a.mb2))
        peak = max(peak, len(alive))
    return peak


def _backward_halves(a: Action) -> list[tuple[int, int, bool]]:
    """(stage, mb, full) of the input-gradient work an action does."""
    if a.op == "B":
        return [(a.stage, a.mb, False)]
    if a.op == "BW":
        return [(a.stage, a.mb, True)]
    if a.op == "FB":
        return [(a.stage2, a.mb2, a.full)]
    return []


class _Replay:
    def __init__(self, actions_per_rank: list[list[Action]], layout: Layout, num_microbatches: int):
        if len(actions_per_rank) != layout.pp:
            raise ScheduleError(f"actions_per_rank has {len(actions_per_rank)} lists: the layout has pp={layout.pp}")
        if layout.num_stages % layout.num_parts or num_microbatches % (layout.num_stages // layout.num_parts):
            raise ScheduleError(f"num_microbatches={num_microbatches}: must split evenly over the layout's "
                                f"{layout.num_stages // layout.num_parts} direction(s)")
        self.lists, self.lay, self.n = actions_per_rank, layout, num_microbatches
        R = layout.pp
        self.f_done = [set() for _ in range(R)]       # (stage, mb) forwarded on this rank
        self.b_done = [dict() for _ in range(R)]      # (stage, mb) -> full? input gradient computed
        self.w_done = [set() for _ in range(R)]       # (stage, mb) whose weight gradient is done
        self.sent: dict[tuple[str, int, int], tuple[int, int]] = {}      # (kind, stage, mb) -> (src, dst)
        self.posted: dict[tuple[str, int, int], tuple[int, int]] = {}    # (kind, stage, mb) -> (src, dst)

    def fail(self, rank: int, i: int, msg: str):
        raise ScheduleError(f"rank {rank}, action #{i} {self.lists[rank][i]}: {msg}")

    def rank_of(self, stage: int) -> int:
        return self.lay.stage_to_rank[stage]

    def check_stage(self, rank: int, i: int, stage: int, mb: int) -> None:
        if not 0 <= stage < self.lay.num_stages:
            self.fail(rank, i, f"stage {stage} is outside 0..{self.lay.num_stages - 1}")
        if mb not in microbatches_of(self.lay, stage, self.n):
            self.fail(rank, i, f"micro-batch {mb} does not flow through stage {stage} "
                               f"(it takes {microbatches_of(self.lay, stage, self.n)})")

    def check_own(self, rank: int, i: int, stage: int, mb: int) -> None:
        self.check_stage(rank, i, stage, mb)
        if self.rank_of(stage) != rank:
            self.fail(rank, i, f"stage {stage} is held by rank {self.rank_of(stage)}")

    # Each `need_*` returns None when the input is there, a description of what is missing when it may still
    # come from another rank, and raises when it can never come.
    def need_forward_input(self, rank: int, i: int, stage: int, mb: int):
        prev = self.lay.prev_stage(stage)
        if prev is None:
            return None
        if self.rank_of(prev) == rank:
            if (prev, mb) not in self.f_done[rank]:
                self.fail(rank, i, f"needs F{prev}.{mb}, which this rank has not run before it")
            return None
        key = ("F", prev, mb)
        if key not in self.posted or self.posted[key][1] != rank:
            self.fail(rank, i, f"needs the activation of stage {prev}, but no RECV_F{prev}.{mb} was posted before it")
        if key not in self.sent:
            return f"SEND_F{prev}.{mb} from rank {self.rank_of(prev)}"
        return None

    def need_backward_input(self, rank: int, i: int, stage: int, mb: int):
        if (stage, mb) not in self.f_done[rank]:
            self.fail(rank, i, f"backward of stage {stage} mb {mb} before its forward")
        if (stage, mb) in self.b_done[rank]:
            self.fail(rank, i, f"second backward of stage {stage} mb {mb}")
        nxt = self.lay.next_stage(stage)
        if nxt is None:
            return None
        if self.rank_of(nxt) == rank:
            if (nxt, mb) not in self.b_done[rank]:
                self.fail(rank, i, f"needs the backward of stage {nxt} mb {mb}, which this rank has not run before it")
            return None
        key = ("B", nxt, mb)
        if key not in self.posted or self.posted[key][1] != rank:
            self.fail(rank, i, f"needs the gradient from stage {nxt}, but no RECV_B{nxt}.{mb} was posted before it")
        if key not in self.sent:
            return f"SEND_B{nxt}.{mb} from rank {self.rank_of(nxt)}"
        return None

    def step(self, rank: int, i: int):
        """Run action i of `rank` if it can run now; return None, or what it waits on."""
        a = self.lists[rank][i]
        lay = self.lay
        if a.op in COMM_OPS:
            self.check_stage(rank, i, a.stage, a.mb)
            kind = a.op[-1]
            if a.op.startswith("SEND"):
                if self.rank_of(a.stage) != rank:
                    self.fail(rank, i, f"sends for stage {a.stage}, held by rank {self.rank_of(a.stage)}")
                dst_stage = lay.next_stage(a.stage) if kind == "F" else lay.prev_stage(a.stage)
                if dst_stage is None or self.rank_of(dst_stage) == rank or self.rank_of(dst_stage) != a.peer:
                    where = "nobody" if dst_stage is None else f"rank {self.rank_of(dst_stage)}"
                    self.fail(rank, i, f"peer {a.peer} is wrong: this data goes to {where}")
                have = (a.stage, a.mb) in (self.f_done[rank] if kind == "F" else self.b_done[rank])
                if not have:
                    self.fail(rank, i, "sends data this rank has not computed before it")
                table = self.sent
            else:
                if self.rank_of(a.stage) != a.peer:
                    self.fail(rank, i, f"peer {a.peer} is wrong: stage {a.stage} is on rank {self.rank_of(a.stage)}")
                dst_stage = lay.next_stage(a.stage) if kind == "F" else lay.prev_stage(a.stage)
                if dst_stage is None or self.rank_of(dst_stage) != rank or a.peer == rank:
                    self.fail(rank, i, "this rank does not consume that data from another rank")
                table = self.posted
            key = (kind, a.stage, a.mb)
            if key in table:
                self.fail(rank, i, "the same data is sent or received twice")
            table[key] = (a.peer, rank) if table is self.posted else (rank, a.peer)
            return None

        waits = []
        if a.op in ("F", "FB"):
            self.check_own(rank, i, a.stage, a.mb)
            if (a.stage, a.mb) in self.f_done[rank]:
                self.fail(rank, i, f"second forward of stage {a.stage} mb {a.mb}")
            waits.append(self.need_forward_input(rank, i, a.stage, a.mb))
        for stage, mb, _ in _backward_halves(a):
            self.check_own(rank, i, stage, mb)
            waits.append(self.need_backward_input(rank, i, stage, mb))
        if a.op == "W":
            self.check_own(rank, i, a.stage, a.mb)
            if self.b_done[rank].get((a.stage, a.mb)) is not False:
                self.fail(rank, i, "W needs an earlier B (not BW) of the same stage and micro-batch")
            if (a.stage, a.mb) in self.w_done[rank]:
                self.fail(rank, i, "second W")
        waits = [w for w in waits if w is not None]
        if waits:
            return " and ".join(waits)

        if a.op in ("F", "FB"):
            self.f_done[rank].add((a.stage, a.mb))
        for stage, mb, full in _backward_halves(a):
            self.b_done[rank][(stage, mb)] = full
            if full:
                self.w_done[rank].add((stage, mb))
        if a.op == "W":
            self.w_done[rank].add((a.stage, a.mb))
        return None


def verify(actions_per_rank: list[list[Action]], layout: Layout, num_microbatches: int) -> Report:
    """Replay all ranks together; raise ScheduleError on any mismatch, deadlock or missing work."""
    rp = _Replay(actions_per_rank, layout, num_microbatches)
    R = layout.pp
    cursor = [0] * R
    waiting: dict[int, str] = {}
    progress = True
    while progress:
        progress = False
        for r in range(R):
            while cursor[r] < len(actions_per_rank[r]):
                wait = rp.step(r, cursor[r])
                if wait is not None:
                    waiting[r] = wait
                    break
                waiting.pop(r, None)
                cursor[r] += 1
                progress = True
    if waiting:
        stuck = "; ".join(f"rank {r} at action #{cursor[r]} {actions_per_rank[r][cursor[r]]} waits on {w}"
                          for r, w in sorted(waiting.items()))
        raise ScheduleError(f"deadlock: {stuck}")

    # every SEND met exactly one RECV on its peer, and the other way round
    for key, (src, dst) in rp.sent.items():
        if rp.posted.get(key) != (src, dst):
            raise ScheduleError(f"SEND_{key[0]}{key[1]}.{key[2]} from rank {src} to rank {dst} has no matching RECV")
    for key, (src, dst) in rp.posted.items():
        if key not in rp.sent:
            raise ScheduleError(f"RECV_{key[0]}{key[1]}.{key[2]} on rank {dst} from rank {src} has no matching SEND")

    for stage in range(layout.num_stages):
        r = layout.stage_to_rank[stage]
        for mb in microbatches_of(layout, stage, num_microbatches):
            for name, done in (("F", rp.f_done[r]), ("B or BW", rp.b_done[r]), ("W", rp.w_done[r])):
                if (stage, mb) not in done:
                    raise ScheduleError(f"rank {r}: stage {stage} mb {mb} never gets its {name}")

    return Report(
        peak_activations=[peak_activations(acts) for acts in actions_per_rank],
        compute_actions=[sum(a.op not in COMM_OPS for a in acts) for acts in actions_per_rank],
        comm_actions=[sum(a.op in COMM_OPS for a in acts) for acts in actions_per_rank],
    )
