"""Process groups of parallel/mesh.py on 4 gloo ranks, and parallel/exchanges.py's NCCL options on a CPU build.

This file also owns the spawning used by every test in tests/parallel: one group of 2 ranks (test_expert.py) and
one of 4 ranks (this file, test_data_parallel.py and the ep=4 part of test_expert.py), each spawned once per pytest
run. Workers compute numbers; the tests assert on them here, in the parent process.
"""
import importlib
import logging
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from parallel.mesh import free_port


# ------------------------------------------------------------------------------------------------ spawning


def _entry(rank: int, world: int, port: int, target: str, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    module, fn = target.split(":")
    try:
        results = getattr(importlib.import_module(module), fn)(rank)
        torch.save(results, os.path.join(outdir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_cache: dict = {}


def spawn_ranks(world: int, target: str) -> list[dict]:
    """Run `module:function`(rank) on `world` spawned ranks (env set for init_mesh); returns each rank's dict.
    Cached per (world, target): a failure is re-raised for every test that needs the results."""
    key = (world, target)
    if key not in _cache:
        try:
            with tempfile.TemporaryDirectory() as outdir:
                mp.spawn(_entry, args=(world, free_port(), target, outdir), nprocs=world, join=True)
                _cache[key] = [torch.load(os.path.join(outdir, f"{r}.pt")) for r in range(world)]
        except Exception as e:  # keep the worker's traceback for every dependent test
            _cache[key] = e
    if isinstance(_cache[key], Exception):
        raise _cache[key]
    return _cache[key]


def four_rank_results() -> list[dict]:
    return spawn_ranks(4, "tests.parallel.test_mesh:four_rank_checks")


def _group_ranks(g) -> list[int]:
    import torch.distributed as dist

    return sorted(dist.get_process_group_ranks(g))


def four_rank_checks(rank: int) -> dict:
    """Everything that needs 4 ranks: meshes pp2/dp2/ep2 and dp4/ep2, data-parallel reduction, ep=4."""
    import torch.distributed as dist

    from parallel.mesh import new_ep_group
    from parallel.mesh import init_mesh
    from tests.parallel.test_data_parallel import data_parallel_checks
    from tests.parallel.test_expert import ep4_checks

    out = {}
    for pp, dp, ep in ((2, 2, 2), (1, 4, 2)):
        mesh = init_mesh(pp, dp, ep, device="cpu", backend="gloo", timeout_s=120)
        tag = f"pp{pp}dp{dp}ep{ep}"
        out[tag] = dict(pp_rank=mesh.pp_rank, dp_rank=mesh.dp_rank, ep_rank=mesh.ep_rank,
                        dp=_group_ranks(mesh.dp_group), pp=_group_ranks(mesh.pp_group),
                        ep=_group_ranks(mesh.ep_group), edp=_group_ranks(mesh.edp_group))
        out[tag]["pipeline"] = mesh.pipeline_ranks()
        if pp == 2:   # DualPipe over 2 pipeline ranks: both parts held by pipeline ranks 0 and 1, a group each
            groups = mesh.mirror_groups({0: (0, 1), 1: (0, 1)})
            out[tag]["mirror"] = {part: _group_ranks(g) for part, g in groups.items()}
            out[tag]["mirror_distinct"] = groups[0] is not groups[1]
            out[tag]["mirror_cached"] = all(g is mesh.mirror_groups({0: (0, 1), 1: (0, 1)})[k]
                                            for k, g in groups.items())
    # DualPipe over 4 pipeline ranks, groups made by init_mesh from the layout's pairs: part p on ranks p and 3 - p
    from framework.parallelize import mirror_pairs

    pairs = mirror_pairs("dualpipe", 4)
    pp4 = init_mesh(4, 1, 1, device="cpu", backend="gloo", timeout_s=120, mirror_pairs=pairs)
    made = pp4.mirror_groups(pairs)
    out["pp4_dualpipe"] = dict(pairs=pairs, mirror={part: _group_ranks(g) for part, g in made.items()},
                               distinct=len({id(g) for g in made.values()}) == len(made))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=made[0] if 0 in made else made[1])
    out["pp4_dualpipe"]["sum"] = float(t)
    # an expert-parallel group built with the SM budget (gloo: no options) carries collectives
    g = new_ep_group([0, 1, 2, 3], "gloo", 20)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=g)
    out["new_ep_group_sum"] = float(t)
    # latency probe: ranks 0 and 1 of a group bounce rank 0's buffer, every member gets rank 0's figure
    from parallel.exchanges import ping_pong_s

    buf = torch.full((4,), float(rank + 1))
    out["ping_world"] = (ping_pong_s(buf, rounds=3), buf.tolist())
    try:
        ping_pong_s(buf, rounds=0)
    except ValueError as e:
        out["ping_bad"] = str(e)
    sub = dist.new_group([1, 3])
    if rank in (1, 3):
        buf = torch.full((2,), float(rank + 1))
        out["ping_sub"] = (ping_pong_s(buf, rounds=3, group=sub), buf.tolist())
    out.update(data_parallel_checks(mesh))           # the dp=4, ep=2 mesh (the loop's last)
    out.update(ep4_checks(init_mesh(1, 4, 4, device="cpu", backend="gloo", timeout_s=120)))
    from tests.framework.test_checkpoint import resume_decision_checks
    out.update(resume_decision_checks(rank))
    return out


# ------------------------------------------------------------------------------------------------ tests

# rank r of a pp x dp mesh: pipeline rank r // dp, data-parallel rank r % dp (written out, not computed)
EXPECTED = {
    "pp2dp2ep2": [
        dict(pp_rank=0, dp_rank=0, ep_rank=0, dp=[0, 1], pp=[0, 2], ep=[0, 1], edp=[0]),
        dict(pp_rank=0, dp_rank=1, ep_rank=1, dp=[0, 1], pp=[1, 3], ep=[0, 1], edp=[1]),
        dict(pp_rank=1, dp_rank=0, ep_rank=0, dp=[2, 3], pp=[0, 2], ep=[2, 3], edp=[2]),
        dict(pp_rank=1, dp_rank=1, ep_rank=1, dp=[2, 3], pp=[1, 3], ep=[2, 3], edp=[3]),
    ],
    "pp1dp4ep2": [
        dict(pp_rank=0, dp_rank=0, ep_rank=0, dp=[0, 1, 2, 3], pp=[0], ep=[0, 1], edp=[0, 2]),
        dict(pp_rank=0, dp_rank=1, ep_rank=1, dp=[0, 1, 2, 3], pp=[1], ep=[0, 1], edp=[1, 3]),
        dict(pp_rank=0, dp_rank=2, ep_rank=0, dp=[0, 1, 2, 3], pp=[2], ep=[2, 3], edp=[0, 2]),
        dict(pp_rank=0, dp_rank=3, ep_rank=1, dp=[0, 1, 2, 3], pp=[3], ep=[2, 3], edp=[1, 3]),
    ],
}


# one pipeline's global ranks, and DualPipe's mirror groups (part -> the two ranks summing its copies)
PIPELINES = {
    "pp2dp2ep2": [dict(pipeline=[0, 2], mirror={0: [0, 2], 1: [0, 2]}), dict(pipeline=[1, 3], mirror={0: [1, 3], 1: [1, 3]}),
                  dict(pipeline=[0, 2], mirror={0: [0, 2], 1: [0, 2]}), dict(pipeline=[1, 3], mirror={0: [1, 3], 1: [1, 3]})],
    "pp1dp4ep2": [dict(pipeline=[0]), dict(pipeline=[1]), dict(pipeline=[2]), dict(pipeline=[3])],
}


@pytest.mark.parametrize("tag", sorted(EXPECTED))
def test_mesh_groups(tag):
    results = four_rank_results()
    for rank, expected in enumerate(EXPECTED[tag]):
        got = dict(results[rank][tag])
        assert {k: got.pop(k) for k in list(got) if k in PIPELINES[tag][rank]} == PIPELINES[tag][rank], (tag, rank)
        if "mirror" in PIPELINES[tag][rank]:   # one group per part, made once and handed out again
            assert got.pop("mirror_distinct") and got.pop("mirror_cached"), (tag, rank)
        assert got == expected, (tag, rank)


def test_mirror_groups_of_dualpipe_pp4():
    """Rank r holds part r (one direction) and part 3 - r (the other): its groups are {r, 3 - r} for both parts."""
    results = four_rank_results()
    assert results[0]["pp4_dualpipe"]["pairs"] == {0: (0, 3), 1: (1, 2), 2: (1, 2), 3: (0, 3)}
    expected = [{0: [0, 3], 3: [0, 3]}, {1: [1, 2], 2: [1, 2]}, {1: [1, 2], 2: [1, 2]}, {0: [0, 3], 3: [0, 3]}]
    for rank, want in enumerate(expected):
        r = results[rank]["pp4_dualpipe"]
        assert r["mirror"] == want and r["distinct"], rank
        assert r["sum"] == {0: 1 + 4, 1: 2 + 3, 2: 2 + 3, 3: 1 + 4}[rank], rank   # the group carries a collective


def test_ping_pong_bounces_rank0s_buffer_and_shares_its_figure():
    results = four_rank_results()
    world = [r["ping_world"] for r in results]
    assert len({t for t, _ in world}) == 1 and world[0][0] > 0
    assert [b for _, b in world] == [[1.0] * 4, [1.0] * 4, [3.0] * 4, [4.0] * 4]   # 2 and 3 only waited
    sub = {rank: results[rank]["ping_sub"] for rank in (1, 3)}
    assert sub[1][0] == sub[3][0] > 0 and sub[1][1] == sub[3][1] == [2.0, 2.0]
    assert "ping_sub" not in results[0] and "ping_sub" not in results[2]
    assert all(r["ping_bad"] == "rounds=0: must be >= 1" for r in results)


def test_new_ep_group_carries_collectives():
    assert [r["new_ep_group_sum"] for r in four_rank_results()] == [6.0] * 4


def test_sm_budget_follows_the_backend_in_use(monkeypatch, caplog):
    from parallel import mesh, nccl

    assert nccl.sm_budget_note("nccl", 20) is None
    # gloo is not applicable even on a torch build that has NCCL: the group's backend decides, not the build
    assert nccl.sm_budget_note("gloo", 20) == ("parallel.comm.sm_budget=20: not applicable (gloo): only NCCL "
                                               "communicators take CTA limits")
    monkeypatch.setattr(mesh, "_said_not_applicable", False)
    monkeypatch.setattr(mesh.dist, "new_group", lambda ranks, backend, pg_options: (ranks, backend, pg_options))
    with caplog.at_level(logging.INFO, logger="parallel.mesh"):
        assert mesh.new_ep_group([0, 1], "gloo", 20) == ([0, 1], "gloo", None)
        assert mesh.new_ep_group([2, 3], "gloo", 20) == ([2, 3], "gloo", None)
    lines = [r.getMessage() for r in caplog.records if r.name == "parallel.mesh"]
    assert lines == [nccl.sm_budget_note("gloo", 20)]                       # once per process


def test_exchange_clock_chooses_by_device_and_backend():
    from parallel.exchanges import exchange_clock

    assert exchange_clock("cpu", "gloo") == "host"
    assert exchange_clock(torch.device("cuda", 0), "gloo") == "host"         # gloo's wait() blocks the host
    assert exchange_clock("cuda:1", "nccl") == "cuda_events"                 # NCCL's wait() only orders streams


class _FakeEvent:
    """A CUDA event on a scripted GPU clock: record() takes the next time of the script (ms)."""

    def __init__(self, script):
        self.script, self.t = script, None

    def record(self):
        self.t = self.script.pop(0)

    def synchronize(self):
        assert self.t is not None

    def elapsed_time(self, other):
        return other.t - self.t


class _FakeWork:
    def __init__(self):
        self.waits = 0

    def wait(self):
        self.waits += 1


def test_cuda_event_exchange_measures_the_compute_stream_stall():
    import contextlib

    from parallel.exchanges import CommRecorder, Exchange

    # GPU clock (ms): launched at 0, data moved at 7; compute reached wait() at 5 and resumed at 7.5
    script = [0.0, 7.0, 5.0, 7.5]
    work, rec = _FakeWork(), CommRecorder()
    events = {"event": lambda: _FakeEvent(script), "stream_ctx": lambda s: contextlib.nullcontext(), "watcher": "w"}
    ex = Exchange("dispatch", work, 64, lambda: "rows", recorder=rec, clock="cuda_events", device="cuda",
                  events=events)
    assert ex.wait() == "rows" and work.waits == 2                          # the watcher's wait and the compute's
    (r,) = rec.records
    assert r.pending is not None                                             # nothing synchronized in the step
    (r,) = rec.resolved()
    assert r.pending is None
    assert r.duration == pytest.approx(7e-3) and r.waited == pytest.approx(2.5e-3)
    assert r.wait_start - r.start == pytest.approx(5e-3)
    assert rec.summary() == {"exchanges": 1, "comm_s": pytest.approx(7e-3), "exposed_s": pytest.approx(2.5e-3),
                             "bytes": 64}
    with pytest.raises(ValueError, match="clock='wall'"):
        Exchange("x", None, 0, lambda: None, clock="wall")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, None])
def test_nccl_options_rejects_bad_budget(bad):
    from parallel.nccl import nccl_options

    with pytest.raises(ValueError, match="parallel.comm.sm_budget"):
        nccl_options(bad)
def test_restart_safe_store_keeps_attempts_apart_on_one_node_and_refuses_across_nodes(monkeypatch):
    """Under torchrun's shared store a restarted group on one node gets a key prefix per restart (so the previous
    attempt's gloo addresses are never read); a restarted multi-node group is told to export the variable."""
    from datetime import timedelta

    import torch.distributed as dist

    from parallel.mesh import restart_safe_store

    t = timedelta(seconds=5)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert restart_safe_store(0, 2, t) is None                         # not torchrun's shared store: env:// as usual
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=t, wait_for_workers=False)
    dist.PrefixStore("duet/restart0/", server).set("key", "old attempt")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    store = restart_safe_store(0, 1, t)
    store.set("key", "new attempt")
    assert dist.PrefixStore("duet/restart1/", server).get("key") == b"new attempt"
    assert dist.PrefixStore("duet/restart0/", server).get("key") == b"old attempt"
    with pytest.raises(ValueError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 exported"):   # 2 nodes of 1 process
        restart_safe_store(0, 2, t)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_safe_store(0, 2, t) is None                         # the first attempt needs nothing
