"""Per-step FP8 summary for the metrics sink (framework/fp8/metrics.py)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from framework.fp8 import Fp8ExpertGemms, Fp8Linear, collect_fp8_stats, fp8_metrics
from framework.fp8 import quantize as Q
from framework.models.deepseek_v3.moe import Experts


def _model():
    torch.manual_seed(0)
    experts = Experts(SimpleNamespace(n_routed_experts=2, hidden_size=128, moe_intermediate_size=64,
                                      expert_impl="grouped"))
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    experts.linear_fn = Fp8ExpertGemms(backend="torch")
    return nn.ModuleDict({"a": Fp8Linear(256, 128, backend="torch"), "b": Fp8Linear(128, 64, backend="torch"),
                          "e": experts})


def _step(model, g):
    x1 = torch.randn(4, 256, generator=g)
    x1[0, 0] = 7.0
    x1[:, 1] = 1e-9  # far below half the smallest subnormal step of its tile: flushed to 0
    x2 = torch.randn(6, 128, generator=g)
    x3 = torch.randn(10, 128, generator=g)
    for x in (x1, x2, x3):  # dY is observed where Dgrad quantizes it, i.e. when the input needs a gradient
        x.requires_grad_()
    loss = model["a"](x1).sum() + model["b"](x2).square().sum() + model["e"](x3, [6, 4]).sum()
    loss.backward()
    return x1.detach(), x2.detach()


def test_summary_pools_every_site_per_role():
    model = _model()
    x1, x2 = _step(model, torch.Generator().manual_seed(1))
    sites = collect_fp8_stats(model, reset=False)  # per-site numbers (each checked in test_linear)
    # the per-site reference for the linears' inputs, from the quantizer directly
    for name, x in (("a", x1), ("b", x2)):
        lost = ((x != 0) & (Q.dequantize_act(*Q.quantize_act(x)) == 0)).sum().item()
        assert sites[f"fp8/{name}/x_underflow_frac"] == lost / x.numel()
        assert sites[f"fp8/{name}/x_amax"] == x.abs().max().item()
    assert sites["fp8/a/x_underflow_frac"] >= 4 / x1.numel()
    names = ["a", "b", "e.gate_up_proj", "e.down_proj"]
    totals = {"x": [4 * 256, 6 * 128, 10 * 128, 10 * 64], "w": [128 * 256, 64 * 128, 2 * 128 * 128, 2 * 128 * 64]}
    totals["dy"] = [4 * 128, 6 * 64, 10 * 128, 10 * 128]

    out = fp8_metrics(model)
    assert out["fp8/sites"] == 4.0
    for role in ("x", "w", "dy"):
        fracs = [sites[f"fp8/{n}/{role}_underflow_frac"] for n in names]
        sats = [sites[f"fp8/{n}/{role}_saturated_frac"] for n in names]
        n = sum(totals[role])
        assert out[f"fp8/{role}_amax"] == max(sites[f"fp8/{s}/{role}_amax"] for s in names)
        assert out[f"fp8/{role}_underflow_frac"] == pytest.approx(
            sum(f * t for f, t in zip(fracs, totals[role])) / n, rel=1e-12)
        assert out[f"fp8/{role}_underflow_frac_max"] == max(fracs)
        assert out[f"fp8/{role}_saturated_frac"] == sum(s * t for s, t in zip(sats, totals[role])) / n == 0.0
    assert out["fp8/x_amax"] == 7.0
    # the read reset the counters; validation passes (no grad) are not recorded
    assert fp8_metrics(model) == {}
    with torch.no_grad():
        model["a"](x1)
        model["e"](torch.randn(3, 128), [1, 2])
    assert fp8_metrics(model) == {}
    # a list of modules (a rank's pipeline parts) pools the same way
    _step(model, torch.Generator().manual_seed(2))
    assert fp8_metrics([model["a"], model["e"]], reset=False)["fp8/sites"] == 3.0
    assert fp8_metrics(nn.Linear(2, 2)) == {}


def test_bad_argument():
    with pytest.raises(ValueError, match="model"):
        fp8_metrics("model")
