"""The hang watchdog on an in-memory store: it names the rank that is behind or silent, and ends a stuck process."""
import time

import pytest
import torch.distributed as dist

from framework.watchdog import STALL_EXIT, Watchdog


def wait_for(cond, limit=10.0):
    end = time.monotonic() + limit
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


@pytest.fixture
def dogs():
    store = dist.HashStore()
    made = [Watchdog(r, 3, timeout_s=1000, store=store, poll_s=0.05, exit_fn=lambda code: None) for r in range(3)]
    for d in made:
        d.start()
    yield made
    for d in made:
        d.stop()


def test_rank_behind_is_named_with_its_operation(dogs):
    for d in dogs:
        d.mark(7, "data")
    dogs[0].mark(7, "forward_backward")
    dogs[1].mark(7, "forward_backward")              # rank 2 never gets past its data
    time.sleep(0.3)
    msg = dogs[0].diagnose()
    assert msg.startswith("hang: stalled rank(s) [2]: rank 2 stalled for ") and "in step 7 'data'" in msg, msg
    assert "seen from rank 0" in msg and "step 7 'forward_backward'" in msg and "\n" not in msg
    assert "stalled rank(s) [2]" in dogs[2].diagnose() and "seen from rank 2 itself" in dogs[2].diagnose()


def test_silent_rank_is_named_when_no_rank_is_behind(dogs):
    for d in dogs:
        d.mark(4, "forward_backward")
    time.sleep(0.3)                                  # every thread has published the mark
    dogs[1].stop()                                   # its process froze: no more heartbeats
    msg = dogs[0].diagnose()
    assert msg.startswith("hang: stalled rank(s) [1]: rank 1 stopped responding (no heartbeat: dead or frozen) "
                          "in step 4 'forward_backward'"), msg


def test_all_level_and_alive_says_so(dogs):
    for d in dogs:
        d.mark(2, "all_reduce loss and gradient norm")
    time.sleep(0.3)
    msg = dogs[1].diagnose()
    assert msg.startswith("hang: no rank is behind: all 3 ranks sit in step 2 'all_reduce loss and gradient norm'"), msg


def test_no_progress_for_timeout_ends_the_process():
    store, codes = dist.HashStore(), []
    live = Watchdog(0, 2, timeout_s=1000, store=store, poll_s=0.05, exit_fn=codes.append).start()
    stuck = Watchdog(1, 2, timeout_s=0.3, store=store, poll_s=0.05, exit_fn=codes.append).start()
    live.mark(1, "forward_backward")
    live.mark(1, "all_reduce loss and gradient norm")
    stuck.mark(1, "data")
    assert wait_for(lambda: codes == [STALL_EXIT])
    assert stuck.fired.startswith("hang: stalled rank(s) [1]: rank 1 stalled for ") and "'data'" in stuck.fired
    assert live.fired is None                        # progress is per rank: the busy rank keeps going
    live.stop()
    stuck.stop()


def test_store_gone_is_reported():
    class Dead:
        def set(self, *a):
            pass

        def set_timeout(self, *a):
            raise ConnectionResetError("peer")

    msg = Watchdog(1, 2, timeout_s=5, store=Dead(), poll_s=0.01).diagnose()
    assert msg.startswith("hang: the job's TCP store is unreachable (ConnectionResetError): its host, rank 0")
    assert "seen from rank 1" in msg


def test_long_phase_on_every_rank_only_warns(caplog):
    store, codes = dist.HashStore(), []
    dogs = [Watchdog(r, 2, timeout_s=0.3, store=store, poll_s=0.05, exit_fn=codes.append).start() for r in range(2)]
    for d in dogs:
        d.mark(9, "evaluate")                        # both busy in a long validation, both alive
    with caplog.at_level("WARNING", logger="duet"):
        assert wait_for(lambda: sum("slow: no rank is behind" in r.getMessage() for r in caplog.records) >= 2)
    assert codes == [] and all(d.fired is None for d in dogs)
    for d in dogs:
        d.stop()


def test_rank_that_dies_as_a_step_starts_is_named_in_that_step(dogs):
    for d in dogs:
        d.mark(4, "checkpoint save")
    time.sleep(0.3)
    dogs[1].mark(5, "data")
    dogs[1].stop()                                   # killed before its thread's next heartbeat
    for d in (dogs[0], dogs[2]):
        d.mark(5, "data")
        d.mark(5, "forward_backward")
    msg = dogs[0].diagnose()
    assert msg.startswith("hang: stalled rank(s) [1]: rank 1 stopped responding (no heartbeat: dead or frozen) "
                          "in step 5 'data'"), msg
