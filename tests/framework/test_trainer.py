"""The single-process trainer: it learns, it resumes exactly, and its checkpoints survive failures."""
import os

import pytest
import torch

from framework.checkpoint import CheckpointError, Checkpointer, check_complete
from framework.trainer import Trainer, TrainingAborted
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
    ref_rng = torch.get_rng_state()
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
    assert torch.equal(torch.get_rng_state(), ref_rng)   # the global RNG too: nothing draws after the restore


def test_sigterm_finishes_the_step_saves_and_a_restart_loses_nothing(make_cfg, tmp_path, monkeypatch, caplog):
    """SIGTERM (SLURM preemption) arrives before step 3: the step runs, a checkpoint is saved, fit returns (exit 0);
    the restart ends bit for bit where the uninterrupted run does."""
    ref = trainer(make_cfg(out=tmp_path / "ref"))
    ref_losses = [h["loss"] for h in ref.fit() if "loss" in h]
    monkeypatch.setenv("DUET_FAULT", "term:step=3")
    import signal
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level("WARNING", logger="duet"):
        first = trainer(make_cfg(out=tmp_path / "r"))
        hist = first.fit()
    assert signal.getsignal(signal.SIGTERM) is before          # the handler is fit()'s only
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3] and first.step == 3
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    assert ck.latest() == ck.folder(3)
    said = [r.getMessage() for r in caplog.records if r.name == "duet"]
    assert said == ["SIGTERM received during step 3: finishing it, then saving a checkpoint",
                    "SIGTERM: stopped after step 3 with a checkpoint saved; a restart with train.resume=auto "
                    "continues from it"], said
    monkeypatch.delenv("DUET_FAULT")
    resumed = trainer(make_cfg(out=tmp_path / "r"))
    assert resumed.step == 3
    losses = [h["loss"] for h in hist if "loss" in h] + [h["loss"] for h in resumed.fit() if "loss" in h]
    assert losses == ref_losses
    a, b = params(ref), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_applies_the_new_lr_and_refuses_other_data(make_cfg, tmp_path, caplog):
    from framework.optim.lr import lr_multiplier

    t = trainer(make_cfg(out=tmp_path / "r"))
    for _ in range(3):
        t.train_step(t.sampler.next_batch())
    t.save_checkpoint()
    t.release()
    with caplog.at_level("WARNING", logger="duet"):
        r = trainer(make_cfg("optim.lr=2e-3", out=tmp_path / "r"))
    o = r.cfg.optim
    want = 2e-3 * lr_multiplier(3, 6, o.schedule, o.warmup_steps, o.min_lr_ratio, o.decay_fraction)
    assert [g["lr"] for g in r.optimizer.param_groups] == [want, want] and r.scheduler.base_lrs == [2e-3, 2e-3]
    said = [m.getMessage() for m in caplog.records if "optim.lr" in m.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"resume: optim.lr=0.002 applies from step 3 on (the checkpoint ran "
                                                 f"with {t.cfg.optim.lr:g}); lr is now {want:.6g}, was "), said
    out = r.train_step(r.sampler.next_batch())
    assert out["lr"] == want
    r.scheduler.step()
    assert r.optimizer.param_groups[0]["lr"] == 2e-3 * lr_multiplier(5, 6, o.schedule, o.warmup_steps,
                                                                       o.min_lr_ratio, o.decay_fraction)
    r.release()
    # another tokenizer / corpus: refused naming the switch, accepted with it
    with pytest.raises(CheckpointError, match=r"was trained on other data or another tokenizer \(data identity "
                                              r"\w{12} vs \w{12} now\); set train\.resume_allow_data_change=true"):
        trainer(make_cfg("data.vocab_size=384", "model.vocab_size=512", out=tmp_path / "r"))
    ok = trainer(make_cfg("data.vocab_size=384", "model.vocab_size=512", "train.resume_allow_data_change=true",
                          out=tmp_path / "r"))
    assert ok.step == 3


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
    with pytest.raises(CheckpointError, match=r"^step 2: saving the checkpoint to .*step_00000002\.tmp failed: disk "
                                              r"full; .*step_00000001 is intact$"):
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


# -- non-finite steps ------------------------------------------------------------------------------------------------
def test_nan_gradient_is_skipped_then_aborts_naming_step_and_parameter(make_cfg, tmp_path, monkeypatch):
    """DUET_FAULT puts a NaN into one gradient from step 2 on: each such step leaves the weights as they were, and the
    third in a row aborts with the step where it began and the parameter it came from."""
    monkeypatch.setenv("DUET_FAULT", "nan:step=2:param=layers.1.mlp.up_proj.weight:count=100")
    t = trainer(make_cfg("train.max_bad_steps=3", out=tmp_path / "r"))
    first = t.train_step(t.sampler.next_batch())
    assert first["skipped_steps"] == 0.0 and t.bad_steps == 0
    before = params(t)
    for n in (2, 3):
        out = t.train_step(t.sampler.next_batch())
        assert out["skipped_steps"] == 1.0 and out["skipped_steps_total"] == n - 1
        assert out["grad_norm"] != out["grad_norm"]                          # NaN
        assert all(torch.equal(before[k], v) for k, v in params(t).items())     # no update from a poisoned step
    with pytest.raises(TrainingAborted) as e:
        t.train_step(t.sampler.next_batch())
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step 4:"), msg
    assert "non-finite 3 steps in a row (train.max_bad_steps=3); first at step 2 in gradient of " \
           "'layers.1.mlp.up_proj.weight'" in msg, msg
    assert t.step == 3 and t.sampler.state.samples_consumed == 4 * 8   # skipped steps still consume their data


def test_single_nan_step_is_skipped_and_training_goes_on(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DUET_FAULT", "nan:step=3")
    hist = trainer(make_cfg(out=tmp_path / "r")).fit()
    steps = [h for h in hist if "loss" in h]
    assert [h["skipped_steps"] for h in steps] == [0, 0, 1, 0, 0, 0]
    assert steps[-1]["skipped_steps_total"] == 1
    assert all(h["grad_norm"] == h["grad_norm"] for h in steps if h["step"] != 3)    # finite again after step 3


def test_forward_nan_is_traced_to_its_module(make_cfg, tmp_path):
    t = trainer(make_cfg("train.max_bad_steps=1", out=tmp_path / "r"))
    with torch.no_grad():
        t.model.layers[1].self_attn.v_proj.weight[3, 5] = float("inf")
    with pytest.raises(TrainingAborted, match=r"^step 1: loss=nan .*first at step 1 in the forward output of module "
                                              r"'layers\.1\.self_attn\.v_proj'$"):
        t.train_step(t.sampler.next_batch())


def test_checkpoint_refuses_non_finite_values(make_cfg, tmp_path):
    t = trainer(make_cfg(out=tmp_path / "r"))
    t.train_step(t.sampler.next_batch())
    good = t.save_checkpoint()
    with torch.no_grad():
        t.model.norm.weight[0] = float("nan")
    t.step += 1
    with pytest.raises(TrainingAborted,
                       match=r"step 2: not saving a checkpoint with non-finite values in model/norm\.weight$"):
        t.save_checkpoint()
    ck = Checkpointer(tmp_path / "r" / "checkpoints")
    assert ck.complete_checkpoints() == [good] and ck.latest() == good


def test_secrets_never_reach_the_checkpoint_config(make_cfg, tmp_path, monkeypatch):
    key = "wandb-fake-key-7f3a9c"
    monkeypatch.setenv("WANDB_API_KEY", key)
    t = trainer(make_cfg(f"logging.wandb.name=run-{key}", out=tmp_path / "r"))
    t.train_step(t.sampler.next_batch())
    folder = t.save_checkpoint()
    text = (folder / "meta.json").read_text()
    assert key not in text and '"name": "run-<WANDB_API_KEY redacted>"' in text


def test_checkpoints_load_without_pickle():
    """Checkpoints are DCP shards + JSON; the one unpickler in the framework is checkpoint.py's, which builds only
    DCP's metadata classes (tests/framework/test_checkpoint.py feeds it a payload); torch.load only weights_only."""
    import re
    from tests.conftest import ROOT

    offenders = []
    for folder in ("framework", "parallel", "schedules", "launch"):
        for path in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bpickle\b|torch\.load\(", line) and "weights_only=True" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    allowed = [o for o in offenders if o.startswith("framework/checkpoint.py:")]
    assert [o for o in offenders if o not in allowed] == []
    assert not any(re.search(r"pickle\.loads?\(|pickle\.Unpickler\(", o) for o in allowed), allowed
    assert any("class _MetadataUnpickler(pickle.Unpickler)" in o for o in allowed), allowed
