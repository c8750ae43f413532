"""Generators and verifier: every schedule replays cleanly; DualPipe(V) follow the reference order exactly;
broken lists are caught with a message that says where."""
import pytest

from schedules import Action, build, check_args, get_layout, verify
from schedules.registry import SCHEDULES
from schedules.verify import ScheduleError


def _valid_cases():
    for name in SCHEDULES:
        for pp in (1, 2, 3, 4, 8):
            for n in (1, 2, 3, 5, 8, 2 * pp, 2 * pp + 2, 3 * pp, 4 * pp + 1):
                try:
                    check_args(name, pp, n)
                except ValueError:
                    continue
                yield name, pp, n


def _ops(actions, compute_only=True):
    return " ".join(str(a) for a in actions if not compute_only or a.peer is None)


def test_every_schedule_verifies_with_expected_work():
    cases = list(_valid_cases())
    assert len(cases) > 100
    for name, pp, n in cases:
        acts = build(name, pp, n)
        rep = verify(acts, get_layout(name, pp), n)
        for r in range(pp):
            ops = [a.op for a in acts[r]]
            if name in ("gpipe", "1f1b"):
                assert rep.compute_actions[r] == 2 * n and ops.count("F") == n == ops.count("BW"), (name, pp, n, r)
            elif name == "zb1p":    # rank 0 runs full backwards, the others split every backward
                assert rep.compute_actions[r] == (2 * n if r == 0 else 3 * n), (name, pp, n, r)
            else:
                # the reference's loop counts: step 4 runs 2*(C - 2H + h + 1) pairs (minus one on the turn rank),
                # step 5 runs H - h - 1 more; (H, h, C) = (pp/2, min(r, pp-1-r), n/2) or (pp, r, n)
                H, h, C = (pp // 2, min(r, pp - 1 - r), n // 2) if name == "dualpipe" else (pp, r, n)
                turn = h == H - 1
                assert ops.count("FB") == 2 * (C - 2 * H + h + 1) - turn + (H - h - 1), (name, pp, n, r)
                # W deferred in step 3 (H-h-1), in the second half of step 6 (h+1 backwards), in step 7 (H-h-1)
                assert ops.count("W") == 2 * (H - h - 1) + (h + 1), (name, pp, n, r)
    # 1F1B warm-up depth: rank r holds at most pp - r activations
    assert verify(build("1f1b", 4, 8), get_layout("1f1b", 4), 8).peak_activations == [4, 3, 2, 1]


def test_dualpipe_pp4_matches_reference_order():
    # traced by hand through deepseek-ai/DualPipe dualpipe.py's eight steps for 4 ranks, 8 chunks:
    # stages 0..3 = direction 0 (mb 0..3 enter on rank 0), stages 4..7 = direction 1 (mb 4..7 enter on rank 3)
    acts = build("dualpipe", 4, 8)
    assert _ops(acts[0]) == ("F0.0 F0.1 F0.2 F7.4 B7.4 W7.4 F7.5 F0.3&BW7.5 F7.6&BW0.0 BW7.6 F7.7&BW0.1 "
                             "BW7.7 B0.2 W0.2 B0.3 W0.3")
    assert _ops(acts[2]) == ("F5.4 F2.0 F5.5 F2.1 F5.6 BW2.0 F2.2&BW5.4 F5.7&BW2.1 F2.3&BW5.5 BW2.2 BW5.6 "
                             "B2.3 B5.7 W2.3 W5.7")
    # a middle rank, with its communication: F0 sent at once in step 2, its last F1 held back until after
    # the first (not overlapped) F0 of step 4
    assert _ops(acts[1], compute_only=False) == (
        "RECV_F0.0@0 F1.0 SEND_F1.0@2 RECV_F0.1@0 RECV_F5.4@2 F6.4 SEND_F6.4@0 F1.1 SEND_F1.1@2 RECV_F0.2@0 "
        "RECV_F5.5@2 F6.5 F1.2 SEND_F6.5@0 RECV_B7.4@0 BW6.4 SEND_F1.2@2 SEND_B6.4@2 RECV_F5.6@2 RECV_B2.0@2 "
        "F6.6&BW1.0 SEND_F6.6@0 SEND_B1.0@0 RECV_F0.3@0 RECV_B7.5@0 F1.3&BW6.5 SEND_F1.3@2 SEND_B6.5@2 "
        "RECV_F5.7@2 RECV_B2.1@2 F6.7&BW1.1 SEND_F6.7@0 SEND_B1.1@0 RECV_B7.6@0 BW6.6 SEND_B6.6@2 RECV_B2.2@2 "
        "BW1.2 SEND_B1.2@0 RECV_B7.7@0 B6.7 SEND_B6.7@2 RECV_B2.3@2 B1.3 SEND_B1.3@0 W6.7 W1.3")


def test_dualpipev_pp2_matches_reference_order():
    # traced by hand through the reference's dualpipev.py for 2 ranks, 4 chunks: stages 0,1 down, 2,3 back up;
    # rank 1 turns each micro-batch around locally (no SEND/RECV between stages 1 and 2)
    acts = build("dualpipev", 2, 4)
    assert _ops(acts[0], compute_only=False) == (
        "F0.0 SEND_F0.0@1 F0.1 SEND_F0.1@1 F0.2 RECV_F2.0@1 F3.0 SEND_F0.2@1 B3.0 SEND_B3.0@1 RECV_F2.1@1 W3.0 "
        "F3.1 F0.3&BW3.1 SEND_F0.3@1 SEND_B3.1@1 RECV_F2.2@1 RECV_B1.0@1 F3.2&BW0.0 BW3.2 SEND_B3.2@1 "
        "RECV_F2.3@1 RECV_B1.1@1 F3.3&BW0.1 BW3.3 SEND_B3.3@1 RECV_B1.2@1 B0.2 W0.2 RECV_B1.3@1 B0.3 W0.3")
    assert _ops(acts[1], compute_only=False) == (
        "RECV_F0.0@0 F1.0 RECV_F0.1@0 F2.0 SEND_F2.0@0 F1.1 RECV_F0.2@0 F2.1 F1.2 SEND_F2.1@0 RECV_B3.0@0 BW2.0 "
        "F2.2&BW1.0 SEND_F2.2@0 SEND_B1.0@0 RECV_F0.3@0 RECV_B3.1@0 F1.3&BW2.1 F2.3&BW1.1 SEND_F2.3@0 "
        "SEND_B1.1@0 RECV_B3.2@0 BW2.2 BW1.2 SEND_B1.2@0 RECV_B3.3@0 B2.3 B1.3 SEND_B1.3@0 W2.3 W1.3")


def test_zb1p_defers_r_weight_gradients_on_rank_r():
    # ZB-H1 (Qi et al. 2023, Fig. 3): rank r runs pp-1-r warm-up F, then r rounds F B with W deferred
    acts = build("zb1p", 4, 8)
    assert _ops(acts[0]) == "F0.0 F0.1 F0.2 F0.3 BW0.0 F0.4 BW0.1 F0.5 BW0.2 F0.6 BW0.3 F0.7 BW0.4 BW0.5 BW0.6 BW0.7"
    assert _ops(acts[2]) == ("F2.0 F2.1 B2.0 F2.2 B2.1 F2.3 B2.2 W2.0 F2.4 B2.3 W2.1 F2.5 B2.4 W2.2 F2.6 B2.5 W2.3 "
                             "F2.7 B2.6 W2.4 B2.7 W2.5 W2.6 W2.7")
    assert _ops(acts[3]).startswith("F3.0 B3.0 F3.1 B3.1 F3.2 B3.2 F3.3 B3.3 W3.0 F3.4 B3.4 W3.1")


@pytest.mark.parametrize("name,pp,n,bad", [
    ("nope", 4, 8, "schedule='nope'"),
    ("1f1b", 0, 8, "pp=0"),
    ("1f1b", 4, 0, "num_microbatches=0"),
    ("gpipe", True, 4, "pp=True"),
    ("dualpipe", 3, 12, "pp=3"),
    ("dualpipe", 4, 6, "num_microbatches=6"),
    ("dualpipe", 4, 9, "num_microbatches=9"),
    ("dualpipev", 3, 5, "num_microbatches=5"),
])
def test_check_args_names_the_argument(name, pp, n, bad):
    with pytest.raises(ValueError, match=bad.replace("(", r"\(")):
        check_args(name, pp, n)
    with pytest.raises(ValueError):
        build(name, pp, n)


def test_check_args_accepts_reference_minimums():
    check_args("dualpipe", 2, 4)
    check_args("dualpipev", 1, 2)
    check_args("dualpipev", 3, 6)     # the reference's DualPipeV does not need an even number of ranks
    check_args("1f1b", 8, 1)          # fewer micro-batches than stages: correct, just bubbly


def _gpipe2():
    return [
        [Action("F", 0, 0), Action("SEND_F", 0, 0, peer=1), Action("RECV_B", 1, 0, peer=1), Action("BW", 0, 0)],
        [Action("RECV_F", 0, 0, peer=0), Action("F", 1, 0), Action("BW", 1, 0), Action("SEND_B", 1, 0, peer=0)],
    ]


def test_verify_reports_deadlock_with_who_waits_on_what():
    lay = get_layout("gpipe", 2)
    acts = _gpipe2()
    assert acts == build("gpipe", 2, 1)
    verify(acts, lay, 1)
    # rank 0 now sends its activation only after its backward: both ranks wait forever
    acts[0] = [Action("F", 0, 0), Action("RECV_B", 1, 0, peer=1), Action("BW", 0, 0), Action("SEND_F", 0, 0, peer=1)]
    with pytest.raises(ScheduleError) as e:
        verify(acts, lay, 1)
    msg = str(e.value)
    assert "deadlock" in msg
    assert "rank 0 at action #2 BW0.0 waits on SEND_B1.0 from rank 1" in msg
    assert "rank 1 at action #1 F1.0 waits on SEND_F0.0 from rank 0" in msg


@pytest.mark.parametrize("edit,expect", [
    (lambda a: a[1].pop(0), "no RECV_F0.0 was posted before it"),
    (lambda a: a[0].__setitem__(1, Action("SEND_F", 0, 0, peer=0)), "peer 0 is wrong"),
    (lambda a: a[1].insert(2, Action("F", 1, 0)), "second forward"),
    (lambda a: a[1].__setitem__(2, Action("B", 1, 0)), "never gets its W"),
    (lambda a: a[1].insert(2, Action("W", 1, 0)), "W needs an earlier B"),
    (lambda a: a[0].insert(0, Action("SEND_F", 0, 0, peer=1)), "has not computed"),
    (lambda a: a[1].append(Action("F", 1, 1)), "micro-batch 1 does not flow through stage 1"),
    (lambda a: a[0].append(Action("F", 1, 0)), "stage 1 is held by rank 1"),
])
def test_verify_catches_broken_lists(edit, expect):
    acts = _gpipe2()
    edit(acts)
    with pytest.raises(ScheduleError, match=expect):
        verify(acts, get_layout("gpipe", 2), 1)


def test_verify_catches_unmatched_send_and_local_order():
    lay = get_layout("gpipe", 2)
    acts = _gpipe2()
    acts = [acts[0][:2], []]                           # rank 1 never receives what rank 0 sends
    with pytest.raises(ScheduleError, match="no matching RECV"):
        verify(acts, lay, 1)
    # DualPipeV's turn is local: the forward of stage pp must follow that of stage pp-1 on the same rank
    acts = build("dualpipev", 2, 4)
    last = acts[1]
    i, j = last.index(Action("F", 1, 0)), last.index(Action("F", 2, 0))
    last[i], last[j] = last[j], last[i]
    with pytest.raises(ScheduleError, match="needs F1.0, which this rank has not run before it"):
        verify(acts, get_layout("dualpipev", 2), 4)
