"""The run-folder lock's rules, without processes: who is refused, what is stale (the two-job test with real
processes is tests/launch/test_launch.py)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from framework.runlock import STALE_AFTER_S, RunFolderLocked, RunLock


def holder(tmp_path, **kw):
    (tmp_path / "run.lock").write_text(json.dumps(kw))


def test_lock_rules(tmp_path, caplog):
    host = socket.gethostname()
    lock = RunLock(tmp_path, "mine")
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text()) == {"host": host, "pid": os.getpid(), "run_id": "mine"}
    lock.release()
    assert not (tmp_path / "run.lock").exists()

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder(tmp_path, host=host, pid=live.pid, run_id="other")   # a live job on this host
        with pytest.raises(RunFolderLocked, match=rf"^run folder {tmp_path} is in use by host {host} pid {live.pid} "
                                                  rf"run other \({tmp_path / 'run.lock'}\); use another "
                                                  rf"hydra\.run\.dir, or stop that job$"):
            RunLock(tmp_path, "mine").acquire()
        with pytest.raises(RunFolderLocked):
            RunLock(tmp_path, "mine").check_free()
        RunLock(tmp_path, "other").check_free()                       # its own other ranks pass the early look
    finally:
        live.kill()
        live.wait()
    with caplog.at_level("WARNING", logger="duet"):
        RunLock(tmp_path, "mine").acquire()                           # dead now: taken over, said once
    assert [r.getMessage() for r in caplog.records] == [
        f"run folder {tmp_path}: taking over a stale lock of a dead process (host {host} pid {live.pid} run other)"]

    holder(tmp_path, host="node7", pid=1, run_id="other")            # another host, fresh heartbeat: refused
    with pytest.raises(RunFolderLocked, match="in use by host node7 pid 1 run other"):
        RunLock(tmp_path, "mine").acquire()
    old = os.path.getmtime(tmp_path / "run.lock") - STALE_AFTER_S - 1
    os.utime(tmp_path / "run.lock", (old, old))                       # ... silent for too long: stale
    caplog.clear()
    with caplog.at_level("WARNING", logger="duet"):
        RunLock(tmp_path, "mine").acquire()
    assert "taking over a stale lock (host node7 pid 1 run other: no heartbeat for" in caplog.records[0].getMessage()
    holder(tmp_path, host="node7", pid=1, run_id="mine")             # this job, restarted with rank 0 elsewhere
    RunLock(tmp_path, "mine").acquire()
    (tmp_path / "run.lock").write_bytes(b"\x00garbage")               # unreadable: stale
    RunLock(tmp_path, "mine").acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["run_id"] == "mine"
