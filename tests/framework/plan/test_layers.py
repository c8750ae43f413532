"""The planner's per-layer formulas against the model itself: parameter counts, FLOPs, bytes kept for backward,
and the eager operator and traffic counts its cpu timing uses."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framework.models.deepseek_v3.model import DeepSeekV3, count_parameters
from framework.plan.layers import block_cost, flops_per_token, head_cost, model_parameters
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny():
    return compose_cfg().model


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "deepseek_v3_small", "deepseek_v3_671b"])
def test_parameters_and_flops_match_the_model(preset):
    m = compose_cfg(f"model={preset}").model
    for mtp in (False, True):
        assert model_parameters(m, include_mtp=mtp) == count_parameters(m, include_mtp=mtp)[0]
    with torch.device("meta"):
        model = DeepSeekV3(m)
    assert flops_per_token(m, 4096) == pytest.approx(model.flops_per_token(4096), rel=1e-12)


def test_671b_has_the_published_sizes():
    m = compose_cfg("model=deepseek_v3_671b").model
    assert model_parameters(m) / 1e9 == pytest.approx(671, abs=0.5)        # V3 §1: 671B main model
    assert model_parameters(m, include_mtp=True) / 1e9 == pytest.approx(682.6, abs=0.1)   # + 11.6B MTP's own


def _saved_bytes(module_forward, model) -> int:
    """Unique storages autograd saves during a forward, parameters excluded (as fp8.memory.saved_tensor_bytes), and
    buffers too: the rotary tables are one storage shared by every layer, not a per-token cost."""
    ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module_forward()
    return sum(seen.values())


@pytest.mark.parametrize("B,T", [(4, 128), (2, 64)])
def test_eager_activation_bytes_match_autograd(tiny, B, T):
    """Bytes per token the eager profile says a block / the head keep, against what autograd saves (fp32)."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny)
    h = torch.randn(B, T, tiny.hidden_size, requires_grad=True)
    ids = torch.randint(0, tiny.vocab_size, (B, T))
    n = B * T
    for layer, moe in ((model.layers[0], False), (model.layers[1], True)):
        measured = _saved_bytes(lambda: layer(h), model) / n
        assert block_cost(tiny, moe, T, 4, fused=False, fp8=False).act_bytes == pytest.approx(measured, rel=0.01)
    measured = _saved_bytes(lambda: model.final(h, ids, ids), model) / n
    assert head_cost(tiny, T, 4, fused=False, fp8=False).act_bytes == pytest.approx(measured, rel=0.01)


class _Count(TorchDispatchMode):
    """Operators and the bytes of their non-matmul inputs and outputs."""
    MATMULS = {"mm", "addmm", "bmm", "_grouped_mm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.ops, self.traffic = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func.__name__.split(".")[0] not in self.MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
            self.traffic += sum(t.numel() * t.element_size() for t in tensors)
        return out


def test_eager_operator_counts_and_traffic(tiny):
    """The cpu timing's constants: operators per forward (backward ~1.6x), elementwise traffic ~8x (forward) and
    ~12x (backward) the bytes kept for backward, at make train's micro-batch (4 x 128; with fewer tokens the
    per-call traffic of weight gradients weighs more). Recounted here so that a change of the modules shows up."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny)
    B, T = 4, 128
    h = torch.randn(B, T, tiny.hidden_size, requires_grad=True)
    for layer, moe in ((model.layers[0], False), (model.layers[1], True)):
        cost = block_cost(tiny, moe, T, 4, fused=False, fp8=False)
        with _Count() as fwd:
            y = layer(h)
        with _Count() as bwd:
            y.sum().backward()
        assert fwd.ops == pytest.approx(cost.ops, rel=0.1)
        assert bwd.ops == pytest.approx(1.6 * cost.ops, rel=0.15)
        assert fwd.traffic / (B * T) == pytest.approx(8 * cost.act_bytes, rel=0.15)
        assert bwd.traffic / (B * T) == pytest.approx(12 * cost.act_bytes, rel=0.15)


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "deepseek_v3_671b"])
def test_gemm_list_carries_the_layer_flops(preset):
    """Each layer's list of linears (what a measured device prices shape by shape) adds up to its FLOPs formulas."""
    from framework.plan.layers import gemm_flops_of

    m = compose_cfg(f"model={preset}").model
    pieces = [block_cost(m, moe, 128, 4, False, False) for moe in (False, True)] + [head_cost(m, 128, 4, False, False)]
    for c in pieces:
        dense, high, expert = gemm_flops_of(c.gemms)
        assert (dense, high, expert) == pytest.approx((c.gemm_flops, c.bf16_flops, c.expert_flops), rel=1e-12)


def test_gemm_shapes_are_the_model_linears(tiny):
    """The (rows, in, out) of every matmul a forward of the tiny model runs outside attention and the experts, read
    from the model with a dispatch mode, are the ones gemm_shapes lists; the experts' grouped GEMMs are listed at
    their even share of the dispatched rows (B T K / E)."""
    from framework.plan.layers import gemm_shapes

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm, self.grouped = set(), set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in ("mm", "addmm"):
                a, b = args[-2], args[-1]
                self.mm.add((a.shape[0], a.shape[1], b.shape[1]))
            elif name == "_grouped_mm":
                self.grouped.add((args[0].shape[-1], args[1].shape[-1]))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = DeepSeekV3(tiny)
    B, T = 2, 32
    with Shapes() as seen:
        model(torch.randint(0, tiny.vocab_size, (B, T)))
    planned = set(gemm_shapes(tiny, B * T))
    per_expert = B * T * tiny.num_experts_per_tok // tiny.n_routed_experts
    experts = {s for s in planned if s[0] == per_expert and s != (B * T, s[1], s[2])}
    assert seen.mm == planned - experts
    assert seen.grouped == {(k, n) for _, k, n in experts}
