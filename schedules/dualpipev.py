"""DualPipeV, the "cut-in-half" DualPipe (deepseek-ai/DualPipe's dualpipev.py; V-shape as in Qi et al.'s ZB-V).

The model is cut into 2*PP parts laid out as a V: rank r runs part r on the way down (phase 0) and part 2*PP-1-r
on the way back (phase 1); every micro-batch enters and leaves on rank 0, and the last rank turns it around
locally, with no communication. One copy of the parameters. The order is DualPipe's eight steps with the full
rank index in place of the half index: 2(PP-r-1) warm-up F0; r+1 rounds F0 F1; PP-r-1 rounds B1 W1 F1; the
overlapped F0&B1, F1&B0 main loop; PP-r-1 rounds B1, F1&B0; r+1 rounds B1 B0 deferring W from the middle on;
PP-r-1 rounds W B0; the r+1 deferred W. The last rank plays the part of DualPipe's middle ranks.
"""
from __future__ import annotations

from .actions import Action, Layout, dualpipev_layout
from .dualpipe import _Program, run_eight_steps


def layout(pp: int) -> Layout:
    return dualpipev_layout(pp)


def generate(pp: int, rank: int, num_microbatches: int) -> list[Action]:
    prog = _Program(layout(pp), stage_of=(rank, 2 * pp - 1 - rank), mb_base=(0, 0))
    return run_eight_steps(prog, pp, rank, num_microbatches, is_turn_rank=(rank == pp - 1),
                           send_f0_at_once=False)
