"""DualPipe, the bidirectional schedule of DeepSeek-V3 (V3 §3.2.1, Fig. 5), in the order of deepseek-ai/DualPipe.

Micro-batches enter from both ends: the first half on rank 0 (direction 0), the second half on rank PP-1
(direction 1); rank r holds part r of direction 0 and part PP-1-r of direction 1. With h = min(r, PP-1-r) and
H = PP/2, each rank runs eight steps: 2(H-h-1) warm-up F0; h+1 rounds F0 F1; H-h-1 rounds B1 W1 F1; the main loop
of overlapped pairs F0&B1, F1&B0 (FB actions, full backward); H-h-1 rounds B1, F1&B0; h+1 rounds B1 B0 whose
second half defers W (zero bubble); H-h-1 rounds W B0; and the h+1 deferred W. "Phase 0" is the direction that
enters on this rank's side of the pipe. SEND/RECV are emitted where the reference posts them.
"""
from __future__ import annotations

from collections import deque

from .actions import Action, Layout, dualpipe_layout
from .p2p import recv_backward_of, recv_forward_of, send_backward_of, send_forward_of


def layout(pp: int) -> Layout:
    return dualpipe_layout(pp)


class _Program:
    """One rank's action list, built with the reference's vocabulary of chunk operations.

    `stage_of[phase]` is the virtual stage run in that phase; `mb_base[phase]` the id of its first micro-batch.
    Counters advance in chunk order per phase, as the reference's current_*_chunk_id do; deferred weight
    gradients are a FIFO, as its WeightGradStore queue.
    """

    def __init__(self, lay: Layout, stage_of: tuple[int, int], mb_base: tuple[int, int]):
        self.lay, self.stage_of, self.mb_base = lay, stage_of, mb_base
        self.actions: list[Action] = []
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.next_send_f = [0, 0]
        self.next_send_b = [0, 0]
        self.next_recv_f = [0, 0]
        self.next_recv_b = [0, 0]
        self.pending_w: deque[tuple[int, int]] = deque()

    def _take(self, counter: list[int], phase: int) -> tuple[int, int]:
        chunk = counter[phase]
        counter[phase] += 1
        return self.stage_of[phase], self.mb_base[phase] + chunk

    # ---- communication: posted, not waited on ----
    def recv_forward(self, phase: int) -> None:
        if recv_forward_of(self.lay, self.stage_of[phase], 0):   # a first stage or a local V turn receives nothing
            self.actions += recv_forward_of(self.lay, *self._take(self.next_recv_f, phase))

    def send_forward(self, phase: int) -> None:
        if send_forward_of(self.lay, self.stage_of[phase], 0):
            self.actions += send_forward_of(self.lay, *self._take(self.next_send_f, phase))

    def recv_backward(self, phase: int) -> None:
        if recv_backward_of(self.lay, self.stage_of[phase], 0):
            self.actions += recv_backward_of(self.lay, *self._take(self.next_recv_b, phase))

    def send_backward(self, phase: int) -> None:
        if send_backward_of(self.lay, self.stage_of[phase], 0):
            self.actions += send_backward_of(self.lay, *self._take(self.next_send_b, phase))

    # ---- computation ----
    def _backward_action(self, phase: int, zero_bubble: bool) -> Action:
        stage, mb = self._take(self.next_b, phase)
        if zero_bubble:
            self.pending_w.append((stage, mb))
            return Action("B", stage, mb)
        return Action("BW", stage, mb)

    def forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(phase)
        self.actions.append(Action("F", *self._take(self.next_f, phase)))
        if send:
            self.send_forward(phase)

    def backward_chunk(self, phase: int, zero_bubble: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_backward(phase)
        self.actions.append(self._backward_action(phase, zero_bubble))
        if send:
            self.send_backward(phase)

    def forward_backward_chunk(self, phase0: int, phase1: int, recv0: bool = True) -> None:
        """Forward of phase0 overlapped with the full backward of phase1 (the reference never defers W here)."""
        if recv0:
            self.recv_forward(phase0)
        self.recv_backward(phase1)
        f_stage, f_mb = self._take(self.next_f, phase0)
        b = self._backward_action(phase1, zero_bubble=False)
        self.actions.append(Action("FB", f_stage, f_mb, stage2=b.stage, mb2=b.mb, full=True))
        self.send_forward(phase0)
        self.send_backward(phase1)

    def weight_chunk(self) -> None:
        self.actions.append(Action("W", *self.pending_w.popleft()))


def run_eight_steps(prog: _Program, num_half_ranks: int, half_rank: int, chunks_per_phase: int,
                    is_turn_rank: bool, send_f0_at_once: bool) -> list[Action]:
    """The eight steps shared by DualPipe and DualPipeV.

    DualPipe: (PP/2, min(r, PP-1-r), N/2, middle rank); DualPipeV: (PP, r, N, last rank). `is_turn_rank` marks
    the rank(s) where the two phases meet; `send_f0_at_once` says whether step 2 sends each phase-0 activation
    right after its forward (DualPipe's middle ranks) or after the phase-1 forward that follows it.
    """
    H, h = num_half_ranks, half_rank

    # Step 1: nF0 -- warm-up of the phase entering on this side
    for _ in range((H - h - 1) * 2):
        prog.forward_chunk(0)

    # Step 2: nF0F1 -- the other phase arrives; each phase-0 input is received one round ahead
    step_2 = h + 1
    prog.recv_forward(0)
    for i in range(step_2):
        prog.forward_chunk(0, recv=False, send=send_f0_at_once)
        prog.recv_forward(0)
        # the turn rank keeps its last phase-1 activation until after its first step-4 forward
        prog.forward_chunk(1, send=(not is_turn_rank) or (i < step_2 - 1))
        if not send_f0_at_once:
            prog.send_forward(0)

    # Step 3: nB1W1F1 -- zero bubble: the weight gradient runs right away, while the next input travels
    for _ in range(H - h - 1):
        prog.backward_chunk(1, zero_bubble=True)
        prog.recv_forward(1)
        prog.weight_chunk()
        prog.forward_chunk(1, recv=False)

    # Step 4: nF0B1F1B0 -- the main loop of overlapped forward & backward pairs
    for i in range(chunks_per_phase - 2 * H + h + 1):
        if i == 0:
            if is_turn_rank:
                # not overlapped, to shorten the bubble (as the reference notes)
                prog.forward_chunk(0, recv=False, send=False)
                prog.send_forward(1)
                prog.backward_chunk(1, send=False)
                prog.send_forward(0)
                prog.send_backward(1)
            else:
                prog.forward_backward_chunk(0, 1, recv0=False)
        else:
            prog.forward_backward_chunk(0, 1)
        prog.forward_backward_chunk(1, 0)

    # Step 5: nB1F1B0
    for _ in range(H - h - 1):
        prog.backward_chunk(1)
        prog.forward_backward_chunk(1, 0)

    # Step 6: nB1B0 -- from the middle of this step on, W is deferred to fill the tail
    step_6 = h + 1
    zero_bubble = False
    for i in range(step_6):
        if i == step_6 // 2 and h % 2 == 1:
            zero_bubble = True
        prog.backward_chunk(1, zero_bubble=zero_bubble)
        if i == step_6 // 2 and h % 2 == 0:
            zero_bubble = True
        prog.backward_chunk(0, zero_bubble=zero_bubble)

    # Step 7: nWB0
    for _ in range(H - h - 1):
        prog.weight_chunk()
        prog.backward_chunk(0, zero_bubble=True)

    # Step 8: nW
    for _ in range(h + 1):
        prog.weight_chunk()
    assert not prog.pending_w, "every deferred weight gradient must have run"
    return prog.actions


def generate(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    lay = layout(pp)
    half = num_microbatches // 2
    second_half = rank >= pp // 2
    # direction 0 = part `rank`, entering at rank 0; direction 1 = part pp-1-rank, entering at rank pp-1
    stage_of_direction = (rank, pp + (pp - 1 - rank))
    mb_base_of_direction = (0, half)
    # phase 0 is the direction that enters on this rank's side of the pipe
    d = (1, 0) if second_half else (0, 1)
    prog = _Program(lay, (stage_of_direction[d[0]], stage_of_direction[d[1]]),
                    (mb_base_of_direction[d[0]], mb_base_of_direction[d[1]]))
    is_middle = rank in (pp // 2 - 1, pp // 2)
    return run_eight_steps(prog, pp // 2, min(rank, pp - 1 - rank), half, is_turn_rank=is_middle,
                           send_f0_at_once=is_middle)
