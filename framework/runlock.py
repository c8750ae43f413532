"""One job per run folder: `<run>/run.lock` names the job that writes there (host, pid, run id, heartbeat).

Rank 0 takes the lock before it reads or writes anything of the folder, and removes it when the job ends. A second
job that finds the lock refuses to start, naming the holder. A lock is stale, and taken over with one line, when
  - its holder's process is gone (same host, pid not alive): a dead job, or this job before torchrun restarted it,
  - it was written on another host by the same job (same run id): a restart that moved rank 0,
  - its holder is on another host and has not refreshed it for STALE_AFTER_S (a background thread refreshes it
    every HEARTBEAT_S; a frozen host stops refreshing too).
The lock is created with O_EXCL, so two jobs starting at the same moment cannot both win.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
log = logging.getLogger("duet")


class RunFolderLocked(ValueError):
    """Another live job holds the run folder. str(err) is one line naming it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process: alive
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path, run_id: str):
        self.path = Path(run_dir) / NAME
        self.run_id = str(run_id)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": self.run_id}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}                                   # unreadable: treated as stale below

    def _stale_reason(self, holder: dict) -> str | None:
        """Why a lock may be taken over, or None when its holder is a live other job."""
        who = f"host {holder.get('host')} pid {holder.get('pid')} run {holder.get('run_id')}"
        if not {"host", "pid", "run_id"} <= holder.keys():
            return "an unreadable lock"
        if holder["host"] == self.me["host"]:
            if holder["pid"] == self.me["pid"]:
                return f"a lock of this process ({who})"
            return None if _alive(int(holder["pid"])) else f"a stale lock of a dead process ({who})"
        if holder["run_id"] == self.run_id:             # torchrun restarted this job; rank 0 moved to this host
            return f"a lock of this same job ({who}: restarted)"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "a lock that just went away"
        return f"a stale lock ({who}: no heartbeat for {age:.0f} s)" if age > STALE_AFTER_S else None

    def check_free(self) -> None:
        """Raise RunFolderLocked if a live other job holds the folder; take nothing (a look before Hydra writes)."""
        holder = self._holder()
        if holder and self.run_id and holder.get("run_id") == self.run_id:
            return                                      # our own job's rank 0 got there first
        if holder and holder != self.me and self._stale_reason(holder) is None:
            raise RunFolderLocked(self._refusal(holder))

    def _refusal(self, holder: dict) -> str:
        return (f"run folder {self.path.parent} is in use by host {holder['host']} pid {holder['pid']} run "
                f"{holder['run_id']} ({self.path}); use another hydra.run.dir, or stop that job")

    def acquire(self) -> None:
        """Take the lock or raise RunFolderLocked naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue                            # released between our open and our read: try again
                if holder == self.me:
                    break
                reason = self._stale_reason(holder)
                if reason is None:
                    raise RunFolderLocked(self._refusal(holder)) from None
                if "this process" not in reason:
                    log.warning(f"run folder {self.path.parent}: taking over {reason}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            break
        else:
            raise RunFolderLocked(f"run folder {self.path.parent}: could not take {self.path} (another job races "
                                  f"for it)")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="duet-runlock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        self.held = False
        if self._holder() == self.me:                   # never remove a lock another job took over
            self.path.unlink(missing_ok=True)
