"""Schedules by name, with the argument rules each one needs.

    gpipe, 1f1b, zb1p  pp >= 1, num_microbatches >= 1 (with fewer micro-batches than pp the pipe never fills,
                       the bubble formulas then do not hold, but the schedules stay correct)
    dualpipe           pp even >= 2, num_microbatches even and >= 2*pp (deepseek-ai/DualPipe asserts the same)
    dualpipev          pp >= 1, num_microbatches >= 2*pp (deepseek-ai/DualPipe's DualPipeV asserts the same)
"""
from __future__ import annotations

from types import ModuleType

from . import dualpipe, dualpipev, gpipe, one_f_one_b, zb1p
from .actions import Action, Layout

SCHEDULES: dict[str, ModuleType] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_args(name: str, pp: int, num_microbatches: int) -> None:
    """Raise ValueError naming the argument, its value and what is allowed."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: allowed {sorted(SCHEDULES)}")
    if not _is_int(pp) or pp < 1:
        raise ValueError(f"pp={pp!r}: must be an integer >= 1")
    if not _is_int(num_microbatches) or num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches!r}: must be an integer >= 1")
    if name == "dualpipe":
        if pp % 2:
            raise ValueError(f"pp={pp} for schedule 'dualpipe': must be even (ranks pair up as mirrors), e.g. {pp + 1}")
        if num_microbatches % 2 or num_microbatches < 2 * pp:
            raise ValueError(f"num_microbatches={num_microbatches} for schedule 'dualpipe' with pp={pp}: "
                             f"must be even and >= 2*pp = {2 * pp}")
    if name == "dualpipev" and num_microbatches < 2 * pp:
        raise ValueError(f"num_microbatches={num_microbatches} for schedule 'dualpipev' with pp={pp}: "
                         f"must be >= 2*pp = {2 * pp}")


def get_layout(name: str, pp: int) -> Layout:
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: allowed {sorted(SCHEDULES)}")
    return SCHEDULES[name].layout(pp)


def build(name: str, pp: int, num_microbatches: int) -> list[list[Action]]:
    """Every rank's action list, rank 0 first."""
    check_args(name, pp, num_microbatches)
    gen = SCHEDULES[name].generate
    return [gen(pp, rank, num_microbatches) for rank in range(pp)]
