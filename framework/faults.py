"""Fault injection for tests of the failure paths: off unless DUET_FAULT is set in the environment.

DUET_FAULT holds one or more comma-separated faults, each `kind:key=value:...`:

  kill:rank=1:step=5        SIGKILL this process just before it runs step 5 (steps count from 1, as in metrics)
  stall:rank=1:step=3       stop responding just before step 3: sleep forever, join no collective
  save_kill:rank=0:step=4   SIGKILL inside the checkpoint save of step 4, after the shards are written and
                            before the folder is complete (the worst moment for atomicity)
  disk_full:rank=0:step=4   the checkpoint save of step 4 fails with ENOSPC after the shards are written
  term:rank=0:step=3        send SIGTERM (what SLURM sends before preempting a job) to this process and, under
                            torchrun, to its agent, just before step 3
  nan:step=2:param=GLOB     write NaN into the gradient of the first parameter whose name matches GLOB
                            (default: the first parameter), at steps 2 .. 2+count-1 (count=1 by default)

`rank` defaults to every rank. A process-level fault (kill, stall, save_kill, disk_full, term) fires once per run folder: it leaves a
marker file `faults/<fault>.fired` in the run folder before acting, so the group torchrun restarts after it runs
clean, which is exactly what an elastic-restart test needs.
"""
from __future__ import annotations

import errno
import fnmatch
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ENV = "DUET_FAULT"
KINDS = ("kill", "stall", "save_kill", "disk_full", "term", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None          # None = every rank
    param: str = "*"                    # nan: glob over parameter names
    count: int = 1                      # nan: consecutive steps that get a NaN

    @property
    def marker(self) -> str:
        who = "all" if self.rank is None else f"rank{self.rank}"
        return f"{self.kind}-{who}-step{self.step}.fired"

    def applies(self, step: int, rank: int) -> bool:
        return (self.rank is None or self.rank == rank) and step == self.step


def parse(spec: str) -> list[Fault]:
    """Faults of a DUET_FAULT value; a malformed one is a ValueError naming it."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}={spec!r}: unknown fault {kind!r}; allowed: {', '.join(KINDS)}")
        kw: dict = {}
        for f in fields:
            key, eq, value = f.partition("=")
            if not eq or key not in ("rank", "step", "param", "count"):
                raise ValueError(f"{ENV}={spec!r}: bad field {f!r} (rank=, step=, param=, count=)")
            kw[key] = value if key == "param" else int(value)
        if "step" not in kw:
            raise ValueError(f"{ENV}={spec!r}: fault {kind!r} needs step=N")
        faults.append(Fault(kind, **kw))
    return faults


@functools.lru_cache(maxsize=4)
def _parsed(spec: str) -> tuple[Fault, ...]:
    return tuple(parse(spec))


def active() -> tuple[Fault, ...]:
    spec = os.environ.get(ENV, "")
    return _parsed(spec) if spec else ()


def _claim(fault: Fault, run_dir: Path) -> bool:
    """True the first time this fault fires for this run folder (the marker survives restarts)."""
    marker = Path(run_dir) / "faults" / fault.marker
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as f:
        f.write(f"pid {os.getpid()} at {time.time():.3f}\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _kill_self(what: str) -> None:
    print(f"fault injection: {what}: SIGKILL pid {os.getpid()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(step: int, rank: int, run_dir: Path) -> None:
    """Called by the training loop before each step."""
    for f in active():
        if f.kind in ("kill", "stall", "term") and f.applies(step, rank) and _claim(f, run_dir):
            if f.kind == "kill":
                _kill_self(f"kill at step {step} on rank {rank}")
            if f.kind == "term":
                _terminate(step, rank)
                continue
            print(f"fault injection: rank {rank} stalls at step {step}", flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)   # frozen: no Python handler runs, torchrun's SIGTERM kills
            while True:            # alive (threads keep running) but never reaches the next collective
                time.sleep(3600)


def _terminate(step: int, rank: int) -> None:
    """SIGTERM to this process and, under torchrun, to the agent (it forwards it to every worker of the group)."""
    print(f"fault injection: SIGTERM before step {step} on rank {rank}", flush=True)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        os.kill(os.getppid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)


def in_save(step: int, rank: int, run_dir: Path) -> None:
    """Called by Checkpointer.save between writing the shards and completing the folder."""
    for f in active():
        if f.kind == "save_kill" and f.applies(step, rank) and _claim(f, run_dir):
            _kill_self(f"kill while saving the checkpoint of step {step} on rank {rank}")
        if f.kind == "disk_full" and f.applies(step, rank) and _claim(f, run_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def poison_grads(step: int, named_params) -> Optional[str]:
    """Write NaN into one gradient (a stand-in for an overflow in the backward). Returns the parameter's name."""
    for f in active():
        if f.kind == "nan" and f.step <= step < f.step + f.count and (f.rank is None or f.rank == _rank()):
            for name, p in named_params:
                if p.grad is not None and fnmatch.fnmatchcase(name, f.param):
                    p.grad.view(-1)[0] = float("nan")
                    return name
    return None


def _rank() -> int:
    return int(os.environ.get("RANK", 0))
