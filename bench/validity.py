"""What a timing benchmark needs to judge its own run: readings of the host taken before, during and after it.

On these shared 2-core VMs a benchmark's figures move with things its own numbers do not show: other processes
(load average), the hypervisor taking the vCPUs away (steal time in /proc/stat), a core slower than the other,
sleeps that overshoot (timer slack), a pinning that did not take. Each reading becomes a `Check` with the limit it
is held to; a report prints them all and withholds the figures a failed check invalidates, saying which and why.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Check:
    name: str
    value: str        # the reading, as printed
    limit: str        # what it is held to
    ok: bool


def cpu_times() -> Optional[list[int]]:
    """Machine-wide CPU time in jiffies from /proc/stat: [user, nice, system, idle, iowait, irq, softirq, steal]."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:9]] + [0] * max(0, 9 - len(fields))


def steal_fraction(before: Optional[list[int]], after: Optional[list[int]]) -> Optional[float]:
    """Share of the CPU time between two readings that the hypervisor gave to other guests."""
    if before is None or after is None:
        return None
    delta = [a - b for a, b in zip(after, before)]
    total = sum(delta)
    return delta[7] / total if total > 0 else 0.0


def sleep_overshoot_us(seconds: float, n: int = 50) -> tuple[float, float]:
    """(median, 90th percentile) of how much later than asked time.sleep(seconds) returns, in microseconds."""
    over = []
    for _ in range(n):
        t = time.perf_counter()
        time.sleep(seconds)
        over.append((time.perf_counter() - t - seconds) * 1e6)
    over.sort()
    return statistics.median(over), over[min(len(over) - 1, int(0.9 * len(over)))]


def set_timer_slack_ns(ns: int = 1000) -> Optional[int]:
    """Ask Linux to wake this process's sleeps within `ns` of their deadline (default slack: 50 us, which an emulated
    link of a few hundred us cannot afford); returns the slack in force, read back, or None where prctl is missing."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, int(ns), 0, 0, 0)          # PR_SET_TIMERSLACK
        return int(libc.prctl(30, 0, 0, 0, 0))    # PR_GET_TIMERSLACK
    except (OSError, AttributeError):
        return None


def median_time(fn: Callable[[], None], n: int = 15, warmup: int = 3) -> float:
    """Median seconds of fn() over n calls after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def busy_seconds(times: Optional[list[int]]) -> float:
    """CPU seconds spent running (user, nice, system, irq, softirq) up to a /proc/stat reading, all cores."""
    if times is None:
        return 0.0
    return (times[0] + times[1] + times[2] + times[5] + times[6]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its waited-for children (the benchmark's workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def quiet_before(seconds: float = 1.0, limit: float = 0.1) -> Check:
    """Share of the machine's CPU busy while this process sleeps for `seconds` just before the run: other work
    would share the cores with the benchmark. (The load average is no use between spawns: it decays over minutes.)"""
    before = cpu_times()
    time.sleep(seconds)
    after = cpu_times()
    cores = os.cpu_count() or 1
    busy = (busy_seconds(after) - busy_seconds(before)) / (seconds * cores) if before and after else 0.0
    return Check(f"machine CPU busy in the {seconds:g} s before the run", f"{busy:.0%}", f"< {limit:.0%}",
                 busy < limit)


class Others:
    """CPU time that other processes took during the run: the machine's busy time minus ours (and our workers')."""

    def __init__(self):
        self.t, self.times, self.own = time.perf_counter(), cpu_times(), own_cpu_seconds()

    def check(self, limit: float = 0.05) -> Check:
        wall = time.perf_counter() - self.t
        others = (busy_seconds(cpu_times()) - busy_seconds(self.times)) - (own_cpu_seconds() - self.own)
        share = max(0.0, others) / (wall * (os.cpu_count() or 1))
        return Check("machine CPU used by other processes during the run", f"{share:.1%}", f"< {limit:.0%}",
                     share < limit)


def no_steal(before, after, limit: float = 0.05) -> Check:
    s = steal_fraction(before, after)
    if s is None:
        return Check("CPU time stolen by the hypervisor during the run", "unknown (no /proc/stat)", f"< {limit:.0%}",
                     True)
    return Check("CPU time stolen by the hypervisor during the run", f"{s:.1%}", f"< {limit:.0%}", s < limit)


def verdict(checks: list[Check]) -> tuple[bool, str]:
    """(all passed, the failed checks in one sentence)."""
    failed = [c for c in checks if not c.ok]
    return not failed, "; ".join(f"{c.name} = {c.value} (allowed {c.limit})" for c in failed)


def checks_table(checks: list[Check]) -> str:
    rows = ["| validity check | reading | allowed | |", "|---|---|---|---|"]
    rows += [f"| {c.name} | {c.value} | {c.limit} | {'ok' if c.ok else 'FAILED'} |" for c in checks]
    return "\n".join(rows)
