"""Deferred weight gradients of SplitLinear land in the parameters, also inside activation checkpointing."""
import torch
from torch.utils.checkpoint import checkpoint

from schedules.weight_grad import SplitLinear, WeightGradStore


def test_deferred_grad_under_checkpoint_matches_linear():
    torch.manual_seed(0)
    lin, ref = SplitLinear(8, 4).double(), torch.nn.Linear(8, 4).double()
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        checkpoint(lin, x, use_reentrant=False).pow(2).sum().backward()
        WeightGradStore.flush()
    finally:
        WeightGradStore.enabled = False
    assert lin.weight.grad is None  # deferred: nothing written until W
    gx = x.grad.clone()
    WeightGradStore.pop()
    x.grad = None
    ref(x).pow(2).sum().backward()
    assert torch.equal(gx, x.grad)
    assert torch.allclose(lin.weight.grad, ref.weight.grad, rtol=0, atol=1e-14)
    assert torch.allclose(lin.bias.grad, ref.bias.grad, rtol=0, atol=1e-14)
