"""The host time per operator of the model's own layers (framework/plan/host.py): the division, and the pieces it
runs against the operator counts the planner multiplies it with."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from framework.plan.host import _pieces, layer_operator_seconds, per_operator
from tests.conftest import compose_cfg


def test_per_operator_divides_each_pass_by_all_pieces_operators():
    times = {"dense block": (1.0, 2.0, 3.0), "head": (3.0, 4.0, 5.0)}
    assert per_operator(times, {"dense block": 10, "head": 30}) == pytest.approx((4 / 40, 6 / 40, 8 / 40))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_pieces_are_the_model_layers_with_the_counted_operators():
    """The dense block, MoE block and head the probe times run (at its handful of tokens) the operators layers.py
    counts for them, within 10%, and defer their weight gradients as a pipeline part's do."""
    from framework.weight_grad import WeightGradStore

    model, pieces = _pieces(OmegaConf.to_object(compose_cfg().model))
    assert set(pieces) == {"dense block", "moe block", "head"}
    for name, (forward, ops) in pieces.items():
        with _Ops() as counted:
            y = forward()
        assert counted.n == pytest.approx(ops, rel=0.1), name
        WeightGradStore.enabled = True
        try:
            y.backward(None if y.dim() == 0 else torch.ones_like(y))
        finally:
            WeightGradStore.enabled = False
        assert WeightGradStore.take_cache(), name          # weight gradients left for W


def test_too_large_a_model_is_not_built():
    assert layer_operator_seconds(compose_cfg("model=deepseek_v3_671b").model) is None
