"""The optimizer-state manager inside the trainer: compact states resume exactly; a format switch is explicit."""
import pytest
import torch

from framework.trainer import Trainer
from parallel.mesh import init_mesh


def trainer(cfg):
    return Trainer(cfg, init_mesh(1, 1, 1, "cpu"))


def test_fp8_states_resume_exactly_and_format_switch_is_explicit(make_cfg, tmp_path):
    fp8 = ("optim.state.exp_avg=fp8", "optim.state.exp_avg_sq=fp8")
    ref = trainer(make_cfg(*fp8, out=tmp_path / "ref"))
    ref_losses = [h["loss"] for h in ref.fit() if "loss" in h]
    report = ref.optimizer.memory_report()
    assert report  # measured from the allocated tensors

    first = trainer(make_cfg(*fp8, out=tmp_path / "run"))
    for _ in range(3):
        first.train_step(first.sampler.next_batch())
    ckpt = first.save_checkpoint()
    first.metrics.close()
    resumed = trainer(make_cfg(*fp8, out=tmp_path / "run"))
    losses = [h["loss"] for h in resumed.fit() if "loss" in h]
    assert losses == ref_losses[3:]
    for (n, a), (_, b) in zip(ref.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n

    # another format on resume: refused, naming both formats, unless asked to convert
    with pytest.raises(ValueError, match="fp8.*bf16|bf16.*fp8"):
        trainer(make_cfg("optim.state.exp_avg=bf16", "optim.state.exp_avg_sq=fp8", f"train.resume={ckpt}",
                         out=tmp_path / "other"))
    converted = trainer(make_cfg("optim.state.exp_avg=bf16", "optim.state.exp_avg_sq=fp8", f"train.resume={ckpt}",
                                 "optim.convert_state=true", out=tmp_path / "conv"))
    assert converted.step == 3
    hist = converted.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist if "loss" in h)
