"""Enumerate the layouts a cluster allows, plan each, rank them, and print the table.

Layouts: every schedule of cluster.schedules, pp dividing the GPU count (even for dualpipe, parts <= layers),
ep dividing both dp and the routed experts, and micro-batches of cluster.micro_batch_sizes sequences that divide the
global batch per data-parallel rank and satisfy the schedule's rule. Ranked by GPU-hours per trillion tokens, the
layouts that fit first; one that does not fit says by how much.
"""
from __future__ import annotations

from dataclasses import replace

from framework.plan.estimate import GiB, Layout, Plan, Planner


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(planner: Planner, schedules, micro_batch_sizes, given: Layout | None = None) -> list[Layout]:
    from schedules.registry import check_args

    m, s = planner.m, planner.s
    out = []
    for schedule in schedules:
        for pp in divisors(s.gpus):
            parts = 2 * pp if schedule == "dualpipev" else pp
            if pp == 1 and schedule != schedules[0]:
                continue    # one stage: every schedule is the same
            if parts > m.num_hidden_layers or (schedule == "dualpipe" and pp % 2 and pp > 1):
                continue
            if m.num_nextn_predict_layers and pp > 1 and schedule not in ("dualpipe", "dualpipev"):
                continue    # MTP shares the embedding with the last stage (framework/config.py's rule)
            dp = s.gpus // pp
            sizes = planner.default_parts(schedule, pp) if pp > 1 else (m.num_hidden_layers,)
            for ep in divisors(dp):
                if ep > 1 and (m.n_routed_experts % ep or m.name != "deepseek_v3"):
                    continue
                for mbs in micro_batch_sizes:
                    if s.global_batch_size % (dp * mbs):
                        continue
                    n = s.global_batch_size // (dp * mbs)
                    try:
                        check_args(schedule if pp > 1 else "1f1b", pp, n)
                    except ValueError:
                        continue
                    out.append(Layout(schedule if pp > 1 else "single", pp, dp, ep, n, mbs, sizes))
    if given is not None and given not in out:
        out.append(given)
    return out


def rank(plans: list[Plan]) -> list[Plan]:
    return sorted(plans, key=lambda p: (not p.fits, p.gpu_hours_per_T if p.fits else p.over_bytes))


def _gb(x: float) -> str:
    return f"{x / GiB:.3g}"


HEADER = ("| # | schedule | pp | dp | ep | mb x size | weights | 2nd copy | grads | master | moments | activations "
          "(in flight) | recompute | workspace | comm buf | runtime | total GiB | fits | step s | bubble | a2a exposed | "
          "tokens/s | MFU | GPU-h / 1T tok |")


def table(plans: list[Plan], given: Layout | None = None, top: int = 10) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    shown = plans[:top] + [p for p in plans[top:] if p.layout == given]
    for i, p in enumerate(shown, start=1):
        L, M = p.layout, p.memory
        fits = "yes" if p.fits else f"no: +{_gb(p.over_bytes)} GiB"
        mark = " (config)" if L == given else ""
        a2a = f"{p.a2a_exposed:.3g} of {p.a2a_total:.3g} s" if p.a2a_total else "-"
        lines.append(
            f"| {i}{mark} | {L.schedule} | {L.pp} | {L.dp} | {L.ep} | {L.micro_batches} x {L.micro_batch_size} | "
            f"{_gb(M.weights)} | {_gb(M.second_copy)} | {_gb(M.grads)} | {_gb(M.master)} | {_gb(M.moments)} | "
            f"{_gb(M.activations)} ({M.peak_inflight}) | {_gb(M.recompute)} | {_gb(M.workspace)} | "
            f"{_gb(M.comm_buffers)} | "
            f"{_gb(M.runtime)} | {_gb(M.total)} | {fits} | {p.step_s:.4g} | {p.bubble:.1%} | {a2a} | "
            f"{p.tokens_per_s:,.0f} | {p.mfu:.1%} | {p.gpu_hours_per_T:,.0f} |")
    return "\n".join(lines)
