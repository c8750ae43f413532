"""DUET_FAULT parsing and the fire-once markers (the hooks themselves are exercised by the trainer and launch tests)."""
import re

import pytest
import torch

from framework import faults
from framework.faults import Fault


def test_parse_and_defaults():
    got = faults.parse("kill:rank=1:step=5, save_kill:step=4,nan:step=2:param=layers.*:count=3")
    assert got == [Fault("kill", 5, 1), Fault("save_kill", 4, None), Fault("nan", 2, None, "layers.*", 3)]
    assert got[0].marker == "kill-rank1-step5.fired" and got[1].marker == "save_kill-all-step4.fired"


@pytest.mark.parametrize("spec, culprit", [("explode:step=1", "unknown fault 'explode'"),
                                           ("kill:rank=1", "needs step=N"),
                                           ("kill:step=1:when=now", "bad field 'when=now'")])
def test_bad_spec_is_named(spec, culprit):
    with pytest.raises(ValueError, match=re.escape(f"DUET_FAULT={spec!r}: ") + ".*" + re.escape(culprit)):
        faults.parse(spec)


def test_fires_once_per_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DUET_FAULT", "stall:rank=0:step=2")
    f = faults.active()[0]
    assert faults._claim(f, tmp_path) and not faults._claim(f, tmp_path)
    assert (tmp_path / "faults" / "stall-rank0-step2.fired").is_file()
    faults.at_step(2, 0, tmp_path)          # already fired here: returns instead of sleeping forever
    faults.at_step(3, 1, tmp_path)          # not this rank or step


def test_nan_hits_the_named_parameter_for_count_steps(monkeypatch):
    monkeypatch.setenv("DUET_FAULT", "nan:step=2:param=b*:count=2")
    named = [(n, torch.nn.Parameter(torch.zeros(3))) for n in ("a", "b1", "b2")]
    for _, p in named:
        p.grad = torch.ones(3)
    assert [faults.poison_grads(s, named) for s in (1, 2, 3, 4)] == [None, "b1", "b1", None]
    assert torch.isnan(named[1][1].grad[0])
    assert torch.isfinite(named[0][1].grad).all() and torch.isfinite(named[2][1].grad).all()
    monkeypatch.delenv("DUET_FAULT")
    assert faults.active() == ()
