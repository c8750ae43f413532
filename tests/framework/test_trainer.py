"""The single-process trainer: it learns, it resumes exactly, and its checkpoints survive failures."""
import os

import pytest
import torch

from framework.checkpoint import CheckpointError, Checkpointer, check_complete
from framework.trainer import Trainer
from parallel.mesh import init_mesh


def trainer(cfg):
    return Trainer(cfg, init_mesh(1, 1, 1, "cpu"))


def params(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


def test_loss_decreases(make_cfg):
    cfg = make_cfg("train.steps=80", "train.eval_interval=80", "optim.lr=1e-2")
    hist = trainer(cfg).fit()
    start, end = hist[0]["val/loss"], hist[-1]["val/loss"]
    assert end < 0.85 * start, (start, end)  # from ln(512) = 6.24 to below 5.3
    assert all(torch.isfinite(torch.tensor(h.get("loss", 0.0))) for h in hist)
    jsonl = (cfg.train.output_dir + "/metrics.jsonl")
    assert os.path.exists(jsonl)


def test_resume_is_exact(make_cfg, tmp_path):
    """Stop at step 3, resume, and see the same losses at steps 4..6 and the same final weights, bit for bit."""
    ref_cfg = make_cfg(out=tmp_path / "ref")
    ref = trainer(ref_cfg)
    ref_hist = ref.fit()
    ref_losses = [h["loss"] for h in ref_hist if "loss" in h]

    cfg = make_cfg(out=tmp_path / "stopped")
    first = trainer(cfg)
    for _ in range(3):
        first.train_step(first.sampler.next_batch())
    first.save_checkpoint()
    first.metrics.close()

    resumed = trainer(make_cfg("train.resume=auto", out=tmp_path / "stopped"))
    assert resumed.step == 3
    hist = resumed.fit()
    losses = [h["loss"] for h in hist if "loss" in h]
    assert losses == ref_losses[3:]  # exact equality on CPU
    a, b = params(ref), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.sampler.state.samples_consumed == ref.sampler.state.samples_consumed


def test_failed_save_keeps_previous(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(out=tmp_path / "r")
    t = trainer(cfg)
    t.train_step(t.sampler.next_batch())
    good = t.save_checkpoint()
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    t.train_step(t.sampler.next_batch())

    import torch.distributed.checkpoint as dcp

    def crash(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        t.save_checkpoint()
    monkeypatch.undo()
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    assert ck.latest() == good
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # untouched
    assert not any(p.name.endswith(".tmp") for p in ck.root.iterdir() if p.is_dir())
    resumed = trainer(make_cfg("train.resume=auto", out=tmp_path / "r"))
    assert resumed.step == 1


def test_corrupt_and_mismatched_checkpoints(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=2", "train.checkpoint_interval=1", "train.keep_checkpoints=3", out=tmp_path / "r")
    trainer(cfg).fit()
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    s1, s2 = ck.complete_checkpoints()
    assert ck.latest() == s2
    shard = next(p for p in s2.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        check_complete(s2)
    assert ck.latest(verbose=False) == s1  # resume=auto falls back to the previous complete one
    with pytest.raises(CheckpointError, match="truncated"):
        trainer(make_cfg(f"train.resume={s2}", out=tmp_path / "x"))
    # another model shape: the error names the tensors
    with pytest.raises(CheckpointError, match=r"another model shape: model/.*\(.*32.*\) vs model \(.*48"):
        trainer(make_cfg("model.hidden_size=48", f"train.resume={s1}", out=tmp_path / "y"))
