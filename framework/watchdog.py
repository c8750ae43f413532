"""Hang detection: every rank says where it is, so a stuck job can name the rank that stopped and what it was doing.

The training loop calls `mark(step, op)` before each phase (data, forward_backward, the loss all-reduce, the
optimizer, a checkpoint save, ...). A background thread publishes that position to the job's TCP store (the one
torch.distributed rendezvoused on) every `poll_s` seconds, with a heartbeat counter. The thread keeps beating even
while the main thread is blocked, so the store always shows each live rank's current phase and how long it has sat
there.

When this rank has made no progress for `timeout_s` (parallel.timeout_s: the same limit gloo/NCCL put on a
collective), the thread reads every rank's entry, names the ranks that are behind (fewest phases done) or that
stopped beating (process dead or frozen), prints one line and ends the process with exit status STALL_EXIT. When
every rank is alive and in the same phase, that is a long phase (a big validation or save) rather than a stall: it
warns once and waits. The main thread, when a collective fails first (gloo's own timeout, a peer that closed its
connection), asks the same `diagnose()` for the line to raise. So every rank of a hung job exits non-zero within
about timeout_s + 2.5 poll_s (poll_s = min(5 s, timeout_s / 4)).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import timedelta
from typing import Optional

STALL_EXIT = 3
PREFIX = "duet/heartbeat/"
log = logging.getLogger("duet")


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None, poll_s: Optional[float] = None,
                 exit_fn=None):
        self.rank, self.world, self.timeout_s = rank, world_size, timeout_s
        self.poll_s = poll_s if poll_s is not None else max(0.5, min(5.0, timeout_s / 4))
        self.store = store
        self.exit_fn = exit_fn or (lambda code: os._exit(code))
        self._done = 0                                # phases entered so far: how far this rank got
        self._step, self._op, self._since = 0, "start", time.monotonic()
        self._beat = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.fired: Optional[str] = None

    @classmethod
    def for_process_group(cls, timeout_s: float, **kw) -> Optional["Watchdog"]:
        """A watchdog on the default group's store; None in a single process (nothing to wait for)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        store = dist.distributed_c10d._get_default_store()
        return cls(dist.get_rank(), dist.get_world_size(), timeout_s, store=store, **kw)

    # -- main thread ------------------------------------------------------------------------------------------------
    def mark(self, step: int, op: str) -> None:
        new_step = step != self._step
        self._done += 1
        self._step, self._op, self._since = step, op, time.monotonic()
        if new_step and self._thread is not None:
            # published now, not at the thread's next beat: a rank that dies at the start of a step must be named
            # in that step, not in the last one its thread happened to publish (one store write per step)
            try:
                self._publish()
            except Exception:
                pass

    def start(self) -> "Watchdog":
        self._publish()                               # every rank's key exists before anyone may read it
        self._thread = threading.Thread(target=self._run, name="duet-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s)

    # -- the thread -------------------------------------------------------------------------------------------------
    def _entry(self) -> dict:
        return {"rank": self.rank, "done": self._done, "step": self._step, "op": self._op,
                "stuck_s": round(time.monotonic() - self._since, 1), "beat": self._beat}

    def _publish(self) -> None:
        self._beat += 1
        if self.store is not None:
            self.store.set(f"{PREFIX}{self.rank}", json.dumps(self._entry()))

    def _run(self) -> None:
        warned = None
        while not self._stop.wait(self.poll_s):
            try:
                self._publish()
            except Exception:                         # the store's host is gone: diagnose() will say so
                pass
            if time.monotonic() - self._since <= self.timeout_s or self._stop.is_set():
                continue
            msg, stalled = self._diagnose()
            if stalled or "unreachable" in msg:
                self.fired = msg
                log.error(msg)                        # console and this rank's log file (stderr if unconfigured)
                self.exit_fn(STALL_EXIT)
                return
            # every rank alive and in the same phase: a long phase (a big validation or save), not a stall; a
            # collective that really hangs is ended by its own timeout, whose error the trainer turns into this line
            if warned != self._done:
                warned = self._done
                log.warning(f"slow: {msg[len('hang: '):]}")

    # -- diagnosis --------------------------------------------------------------------------------------------------
    def _read_all(self) -> dict[int, dict]:
        keys = [f"{PREFIX}{r}" for r in range(self.world)]
        self.store.set_timeout(timedelta(seconds=max(2.0, self.poll_s)))
        present = [k for k in keys if self.store.check([k])]
        return {json.loads(v)["rank"]: json.loads(v) for v in
                (self.store.get(k).decode() for k in present)}

    def diagnose(self) -> str:
        """One line naming the ranks that stalled, where, and what this rank was waiting in."""
        return self._diagnose()[0]

    def _diagnose(self) -> tuple[str, list[int]]:
        me = f"seen from rank {self.rank}, {time.monotonic() - self._since:.0f} s in step {self._step} '{self._op}'"
        if self.store is None:
            return f"hang: {me} (parallel.timeout_s={self.timeout_s:g})", []
        try:
            first = self._read_all()
            end = time.monotonic() + 1.5 * self.poll_s  # a live rank's thread beats at least once in this window,
            while time.monotonic() < end:               # and so do we (peers are diagnosing us at the same time)
                self._publish()
                time.sleep(self.poll_s / 2)
            second = self._read_all()
        except Exception as e:
            return (f"hang: the job's TCP store is unreachable ({type(e).__name__}): its host, rank 0 (or torchrun's "
                    f"agent when the workers share its store), is probably dead; {me} "
                    f"(parallel.timeout_s={self.timeout_s:g})"), []
        seen = {**first, **second}
        if not seen:
            return f"hang: {me}; no rank has published a heartbeat (parallel.timeout_s={self.timeout_s:g})", []
        beat = lambda entries, r: entries.get(r, {}).get("beat")  # noqa: E731
        silent = sorted(r for r in seen if r != self.rank and beat(second, r) == beat(first, r))
        missing = sorted(set(range(self.world)) - set(seen))     # never published: never reached training
        most = max(e["done"] for e in seen.values())
        behind = sorted(r for r, e in seen.items() if e["done"] < most)
        # a rank that is ahead and silent has left after its own diagnosis: not the cause
        stalled = behind if behind else silent
        stalled = sorted(set(stalled) | set(missing))
        parts = [f"rank {r} never reported (did not start)" for r in missing]
        for r in stalled:
            if r in missing:
                continue
            e = seen[r]
            state = "stopped responding (no heartbeat: dead or frozen)" if r in silent else \
                f"stalled for {e['stuck_s']:.0f} s"
            parts.append(f"rank {r} {state} in step {e['step']} '{e['op']}'")
        if not parts:
            ops = sorted({f"step {e['step']} '{e['op']}'" for e in seen.values()})
            parts.append(f"no rank is behind: all {len(seen)} ranks sit in {', '.join(ops)} (a collective that "
                         f"not every rank entered, or a peer outside this job)")
        if self.rank in stalled:
            me = f"seen from rank {self.rank} itself"
        head = f"hang: stalled rank(s) {stalled}: " if stalled else "hang: "
        return f"{head}{'; '.join(parts)}; {me} (parallel.timeout_s={self.timeout_s:g})", stalled
