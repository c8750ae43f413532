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


def test_head_seconds_divide_by_logits_and_zeroed_values():
    """head_seconds: the forward's time per logit of [LOGIT_ROWS, V], the backward's as (forward + backward) minus
    the forward, and a V x C zeroing per value; each measured function runs (a fake clock gives 1, 3, 0.5 s)."""
    from framework.plan.host import LOGIT_ROWS, head_seconds

    cfg = OmegaConf.to_object(compose_cfg().model)
    clock = iter([1.0, 3.0, 0.5] * 2)

    def seconds_per_call(fn, budget):
        fn()
        return next(clock)

    got = head_seconds(cfg, seconds_per_call, rounds=2)
    n = LOGIT_ROWS * cfg.vocab_size
    assert got["logit_s"] == pytest.approx((1.0 / n, 2.0 / n), rel=1e-12)
    assert got["zero_s"] == pytest.approx(0.5 / (cfg.vocab_size * cfg.hidden_size), rel=1e-12)
    assert head_seconds(compose_cfg("model=deepseek_v3_671b").model, seconds_per_call) == {}


class _Named(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def test_head_logits_and_zeroed_buffers_are_the_model_head():
    """The head the probe runs log-softmaxes layers.py's `logits` per token (V for the main head and each MTP
    depth) and its backward builds `zeroed` values of dense embedding gradient (V x C per depth)."""
    from framework.plan.layers import head_cost

    cfg = OmegaConf.to_object(compose_cfg().model)
    V, C, D = cfg.vocab_size, cfg.hidden_size, cfg.num_nextn_predict_layers
    model, pieces = _pieces(cfg)
    with _Named() as mode:
        pieces["head"][0]().backward()
    softmax = [s for f, s in mode.seen if f == "aten._log_softmax.default"]
    assert [s[-1] for s in softmax] == [V] * (1 + D)
    assert sum(s[-1] for s in softmax) == head_cost(cfg, 1, 4, False, False).logits
    dense = [s for f, s in mode.seen if f == "aten.embedding_dense_backward.default"]
    assert sum(s[0] * s[1] for s in dense) == head_cost(cfg, 1, 4, False, False).zeroed == D * V * C
