"""Checkpoints that cannot be fooled: nothing in a folder runs code, every file is checksummed, a bad newest
checkpoint is skipped, a folder without any valid one is left exactly as it was."""
import dataclasses
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from framework.checkpoint import CheckpointError, Checkpointer, check_complete, read_metadata
from framework.trainer import Trainer
from parallel.mesh import init_mesh


def trainer(cfg):
    return Trainer(cfg, init_mesh(1, 1, 1, "cpu"))


class Payload:
    """Unpickling this writes a marker file: proof that the bytes ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and fix its size and sha256 in meta.json, as an attacker would."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_crafted_metadata_runs_through_no_entry(make_cfg, tmp_path):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Payload(marker))
    pickle.loads(evil)                       # the payload is live: unpickled naively, it writes the marker
    assert marker.read_text() == "ran"
    marker.unlink()

    t = trainer(make_cfg("train.steps=2", out=tmp_path / "run"))
    t.train_step(t.sampler.next_batch())
    good = t.save_checkpoint()
    t.train_step(t.sampler.next_batch())
    bad = t.save_checkpoint()
    t.release()
    # the payload nested inside real DCP metadata, so the unpickler has to refuse a class, not a shape
    md = read_metadata(bad)
    md.planner_data = {"x": Payload(marker)}
    rewrite(bad, ".metadata", pickle.dumps(md))
    tensors = {f"model/{k}": v for k, v in t.step_fn.state_tensors().items()}

    refused = r"file \.metadata is not DCP metadata \(builtins\.exec is not part of DCP's metadata\)"
    with pytest.raises(CheckpointError, match=refused):              # the library entry
        Checkpointer.load(bad, tensors)
    with pytest.raises(CheckpointError, match=refused):              # the optimizer manager's template
        t.optimizer.sharded_state_dict(like=bad)
    with pytest.raises(CheckpointError, match=refused):              # train.resume=<folder>
        trainer(make_cfg(f"train.resume={bad}", out=tmp_path / "other"))
    resumed = trainer(make_cfg("train.resume=auto", out=tmp_path / "run"))   # auto: skipped, falls back
    assert resumed.step == 1 and resumed.resume_from.folder == good
    resumed.release()

    # launch.sample / launch.rl rl.init: a post-training checkpoint with the payload
    from omegaconf import OmegaConf

    from framework.models import build_model
    from launch.sample import main as sample_main

    mc = OmegaConf.to_object(t.cfg.model)
    policy = build_model(mc)
    rl = Checkpointer(tmp_path / "rl" / "checkpoints").save(
        1, {f"model/{k}": v for k, v in policy.state_dict().items()},
        {"model": dataclasses.asdict(mc), "tokenizer": "char", "config": {}})
    rewrite(rl, ".metadata", evil)
    assert sample_main(["--checkpoint", str(rl), "--out", str(tmp_path / "s.jsonl"), "--problems", "1"]) == 2

    # a checkpoint whose entry is pickled bytes (DCP would torch.load it with weights_only=False)
    import torch.distributed.checkpoint as dcp
    key = next(iter(tensors))
    sneaky = tmp_path / "bytes" / "step_00000001"
    dcp.save({key: Payload(marker)}, checkpoint_id=str(sneaky), no_dist=True)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sneaky.iterdir()}
    (sneaky / "meta.json").write_text(json.dumps({"format_version": 2, "step": 1, "files": files}))
    with pytest.raises(CheckpointError, match=rf"entry '{key}' is not stored as a tensor: refused"):
        Checkpointer.load(sneaky, {key: tensors[key]})
    # a shard holding a pickle (DCP reads shards with weights_only=True; we say so in one line)
    shard = next(p.name for p in good.iterdir() if p.suffix == ".distcp")
    rewrite(good, shard, evil + b"\0" * max(0, (good / shard).stat().st_size - len(evil)))
    with pytest.raises(CheckpointError, match=rf"checkpoint {good}: reading its shards failed \(.*\)$"):
        Checkpointer.load(good, {k: v.clone() for k, v in tensors.items()})
    assert not marker.exists()


def test_every_file_is_checksummed_and_bad_checkpoints_are_skipped_or_named(make_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    trainer(make_cfg("train.steps=3", "train.checkpoint_interval=1", "train.keep_checkpoints=3", out=run)).fit()
    ck = Checkpointer(run / "checkpoints")
    s1, s2, s3 = ck.complete_checkpoints()
    meta = json.loads((s3 / "meta.json").read_text())
    assert set(meta["files"]) == {p.name for p in s3.iterdir()} - {"meta.json"}
    for name, entry in meta["files"].items():
        assert entry == {"bytes": (s3 / name).stat().st_size,
                         "sha256": hashlib.sha256((s3 / name).read_bytes()).hexdigest()}
    assert not (run / "run.lock").exists()                  # the job gave the folder back

    # same-size corruption of the newest shard: skipped with one line, auto falls back to step 2
    shard = next(p for p in s3.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert ck.latest() == s2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"resume: skipping checkpoint {s3}: file {shard.name} does not match its sha256 in meta.json "
                   f"(corrupt)"]
    with pytest.raises(CheckpointError, match=rf"^checkpoint {s3}: file {shard.name} does not match its sha256"):
        trainer(make_cfg(f"train.resume={s3}", out=tmp_path / "x"))

    # a garbage `latest` is ignored in one line
    (ck.root / "latest").write_bytes(b"\xff\xfe../../etc\n\x00")
    capsys.readouterr()
    assert ck.latest() == s2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"resume: ignoring {ck.root / 'latest'}: names ") and len(lines) == 2

    # no valid checkpoint left: refuse, and leave every byte of the run folder as it was
    (s2 / ".metadata").write_bytes(b"junk")
    (s1 / "meta.json").unlink()
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=rf"^train\.resume=auto: none of the 3 checkpoints in {ck.root} is "
                                              rf"valid \(newest: checkpoint {s3}: .*\); nothing was changed$"):
        trainer(make_cfg("train.resume=auto", out=run))
    assert snapshot(run) == before and not (run / "run.lock").exists()


def test_disk_full_during_save_keeps_the_previous_checkpoint(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DUET_FAULT", "disk_full:step=4")
    run = tmp_path / "run"
    t = trainer(make_cfg("train.checkpoint_interval=2", out=run))
    with pytest.raises(CheckpointError) as e:
        t.fit()
    ck = Checkpointer(run / "checkpoints")
    assert str(e.value) == (f"step 4: saving the checkpoint to {ck.root / 'step_00000004.tmp'} failed: [Errno 28] "
                            f"No space left on device; {ck.root / 'step_00000002'} is intact")
    assert ck.complete_checkpoints() == [ck.root / "step_00000002"] and ck.latest() == ck.root / "step_00000002"
    assert sorted(p.name for p in ck.root.iterdir()) == ["latest", "step_00000002"]     # no half-written folder
    check_complete(ck.root / "step_00000002")
    assert not (run / "run.lock").exists()


# -- one decision for every rank (run inside tests/parallel/test_mesh.py's 4-rank group) --------------------------
def fake_checkpoint(root: Path, step: int) -> Path:
    """A valid checkpoint folder holding x = [step, step], written by this process alone."""
    import torch.distributed.checkpoint as dcp

    from framework.checkpoint import FORMAT_VERSION, _file_table

    folder = root / f"step_{step:08d}"
    dcp.save({"x": torch.full((2,), float(step))}, checkpoint_id=str(folder), no_dist=True)
    (folder / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step,
                                                  "files": _file_table(folder)}))
    return folder


def resume_decision_checks(rank: int) -> dict:
    """Each rank sees its own checkpoints folder: rank 0 the step-2 checkpoint, the others a newer step 4 too (a
    folder changing between reads). Every rank must resume what rank 0 chose, and get rank 0's error."""
    import tempfile
    import warnings
    from types import SimpleNamespace

    from framework.checkpoint import load_tensors
    from framework.resume import decide

    cfg = SimpleNamespace(train=SimpleNamespace(resume="auto"))
    root = Path(tempfile.mkdtemp(prefix=f"view{rank}-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # dcp.save(no_dist=True) warns inside a process group
        chosen = fake_checkpoint(root, 2)
        if rank != 0:
            fake_checkpoint(root, 4)
    d = decide(cfg, Checkpointer(root), rank, True, None)
    shared = d.folder                              # rank 0's folder: on a cluster, the one shared file system
    x = {"x": torch.zeros(2)}
    load_tensors(shared, x)                        # collective, through the safe reader
    out = {"resume_folder_is_rank0s": shared == chosen if rank == 0 else shared.name == "step_00000002",
           "resume_step": d.meta["step"], "resume_x": x["x"].tolist()}
    out.update(save_failure_checks(rank))
    (chosen / ".metadata").write_bytes(b"junk")     # now rank 0 has no valid checkpoint; the others still do
    try:
        decide(cfg, Checkpointer(root), rank, True, None)
        out["resume_error"] = None
    except CheckpointError as e:
        out["resume_error"] = str(e).replace(str(root), "<root>") if rank == 0 else str(e)
    return out


def save_failure_checks(rank: int) -> dict:
    """Rank 1's disk fills up while saving step 2: every rank raises the same one line, step 1 stays selected."""
    import tempfile

    import torch.distributed as dist

    from framework.checkpoint import CheckpointSaveError

    shared = [tempfile.mkdtemp(prefix="shared-") if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    ck = Checkpointer(Path(shared[0]) / "checkpoints")
    ck.save(1, {f"x{rank}": torch.full((2,), 1.0)}, {})
    os.environ["DUET_FAULT"] = "disk_full:rank=1:step=2"
    try:
        ck.save(2, {f"x{rank}": torch.full((2,), 2.0)}, {})
        error = None
    except CheckpointSaveError as e:
        error = str(e).replace(shared[0], "<root>")
    finally:
        del os.environ["DUET_FAULT"]
    dist.barrier()
    return {"save_error": error, "save_latest": ck.latest(verbose=False).name,
            "save_left": sorted(p.name for p in ck.root.iterdir())}


def test_rank0_decides_for_every_rank():
    from tests.parallel.test_mesh import four_rank_results

    res = four_rank_results()
    assert [r["resume_folder_is_rank0s"] for r in res] == [True] * 4
    assert [r["resume_step"] for r in res] == [2] * 4 and [r["resume_x"] for r in res] == [[2.0, 2.0]] * 4
    errors = {r["resume_error"] for r in res[1:]}
    assert len(errors) == 1 and errors.pop().startswith("train.resume=auto: none of the 1 checkpoints in ")
    assert res[0]["resume_error"].startswith("train.resume=auto: none of the 1 checkpoints in <root> is valid")
    # a save that fails on one rank fails on all, in the same words, and leaves the previous checkpoint selected
    assert [r["save_error"] for r in res] == ["step 2: saving the checkpoint to <root>/checkpoints/step_00000002.tmp "
                                              "failed: [Errno 28] No space left on device; "
                                              "<root>/checkpoints/step_00000001 is intact"] * 4
    assert all(r["save_latest"] == "step_00000001" and r["save_left"] == ["latest", "step_00000001"] for r in res)
