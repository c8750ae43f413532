"""The emulated-bf16 baseline (framework/fp8/bf16_emulation.py) against float64 products of bf16-rounded operands."""
import pytest
import torch
from torch import nn

from framework.fp8.bf16_emulation import Bf16EmulatedLinear, bf16_grouped, convert_to_bf16_emulation


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def bf64(t):
    """t rounded to bf16, as float64 (exact: bf16 values are float64 values)."""
    return t.detach().to(torch.bfloat16).double()


def test_linear_three_gemms_use_bf16_operands():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(200, 70)
    convert_to_bf16_emulation(nn.Sequential(lin))
    assert type(lin) is Bf16EmulatedLinear
    x = torch.randn(3, 5, 200, generator=g).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    # only the bf16 copies are kept: 2 bytes per element of x and of the weight
    assert [t.dtype for t in saved] == [torch.bfloat16] * 2
    assert sum(t.numel() * t.element_size() for t in saved) == 2 * (x.numel() + lin.weight.numel())
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, 200), dy.reshape(-1, 70)
    assert rel(y.detach().reshape(-1, 70), bf64(x2) @ bf64(lin.weight).t() + lin.bias.double()) <= 1e-6
    assert rel(x.grad.reshape(-1, 200), bf64(dy2) @ bf64(lin.weight)) <= 1e-6
    assert rel(lin.weight.grad, bf64(dy2).t() @ bf64(x2)) <= 1e-6
    assert rel(lin.bias.grad, dy2.double().sum(0)) <= 1e-6  # the bias gradient is not rounded


@pytest.mark.parametrize("counts", [[4, 0, 9], torch.tensor([1, 11, 1])])
def test_grouped_gemms_per_expert(counts):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 24, 40, generator=g).requires_grad_()
    x = torch.randn(13, 40, generator=g).requires_grad_()
    y = bf16_grouped(x, counts, w)
    dy = torch.randn(13, 24, generator=g)
    y.backward(dy)
    s = 0
    for e, c in enumerate(torch.as_tensor(counts).tolist()):
        rows = slice(s, s + c)
        s += c
        if c == 0:
            assert torch.equal(w.grad[e], torch.zeros(24, 40))
            continue
        assert rel(y.detach()[rows], bf64(x[rows]) @ bf64(w[e]).t()) <= 1e-6
        assert rel(x.grad[rows], bf64(dy[rows]) @ bf64(w[e])) <= 1e-6
        assert rel(w.grad[e], bf64(dy[rows]).t() @ bf64(x[rows])) <= 1e-6


def test_conversion_keeps_parameters_and_bad_input_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    params = [p for p in model.parameters()]
    keys = list(model.state_dict())
    assert convert_to_bf16_emulation(model, exclude=["1"]) == ["0"]
    assert type(model[0]) is Bf16EmulatedLinear and type(model[1]) is nn.Linear
    assert [p for p in model.parameters()] == params and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="sum to the 5 rows"):
        bf16_grouped(torch.randn(5, 8), [2, 2], torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="1-D integer tensor"):   # the same check as the FP8 experts'
        bf16_grouped(torch.randn(5, 8), torch.tensor([2.0, 3.0]), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="experts"):
        bf16_grouped(torch.randn(5, 8), [2, 3, 0], torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="weights"):
        bf16_grouped(torch.randn(5, 8), [5], torch.randn(1, 4, 6))
