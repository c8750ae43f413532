"""Bytes the linears keep for backward (framework/fp8/memory.py) against exact byte counts."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from framework.fp8 import Fp8Linear, convert_to_bf16_emulation, convert_to_fp8, saved_tensor_bytes
from framework.fp8.memory import ambiguous_token_counts
from framework.models.deepseek_v3.moe import Experts

M, K, C, I, E = 100, 256, 384, 192, 3
COUNTS = [37, 0, 63]


class _Net(nn.Module):
    """A linear feeding MoE experts: every GEMM site kind of the model."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, C, bias=False)
        self.experts = Experts(SimpleNamespace(n_routed_experts=E, hidden_size=C, moe_intermediate_size=I,
                                               expert_impl="grouped"))
        with torch.no_grad():
            self.experts.gate_up_proj.normal_(0, 0.05)
            self.experts.down_proj.normal_(0, 0.05)

    def forward(self, x):
        return self.experts(self.lin(x), COUNTS)


def tiles(n):
    return math.ceil(n / 128)


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_saved_bytes_of_linears_and_experts(fmt):
    torch.manual_seed(0)
    net = _Net()
    if fmt == "fp8":
        convert_to_fp8(net, backend="torch")
    else:
        convert_to_bf16_emulation(net)
    x = torch.randn(M, K, requires_grad=True)
    got = saved_tensor_bytes(net, lambda: net(x))
    widths = [(K, C), (C, 2 * I), (I, C)]  # (in, out) of the linear, gate_up and down
    if fmt == "fp8":  # 1 byte per value + an fp32 scale per 1x128 tile / 128x128 block
        acts = sum(M * k + 4 * M * tiles(k) for k, _ in widths)
        weights = (C * K + 4 * tiles(C) * tiles(K)) + sum(E * (n * k + 4 * tiles(n) * tiles(k)) for k, n in widths[1:])
    else:  # 2 bytes per value
        acts = sum(2 * M * k for k, _ in widths)
        weights = 2 * (C * K + sum(E * n * k for k, n in widths[1:]))
    assert (got.activations, got.weight_copies, got.sites) == (acts, weights, 3)
    # the whole forward also saved the SwiGLU's fp32 operands (silu input, up, silu output): 3 * M * I * 4 bytes
    assert got.model_total >= acts + weights + 3 * M * I * 4
    assert M not in ambiguous_token_counts(net)


def test_single_linear_saves_only_its_copies_and_grad_is_required():
    lin = Fp8Linear(K, C, bias=False, backend="torch", track_stats=False)
    model = nn.Sequential(lin)
    x = torch.randn(M, K, requires_grad=True)
    got = saved_tensor_bytes(model, lambda: model(x))
    assert got.model_total == got.activations + got.weight_copies == M * K + 4 * M * 2 + C * K + 4 * 3 * 2
    assert ambiguous_token_counts(model) == {C, tiles(C)}
    with torch.no_grad(), pytest.raises(ValueError, match="grad"):
        saved_tensor_bytes(model, lambda: model(x))
