"""FP8 (and emulated bf16) MoE experts: the Experts.linear_fn hook set by convert_to_fp8 / convert_to_bf16_emulation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from framework.config import ModelConfig
from framework.fp8 import (Bf16ExpertGemms, Fp8ExpertGemms, Fp8Linear, collect_fp8_stats, convert_to_bf16_emulation,
                           convert_to_fp8, fp8_metrics)
from framework.fp8 import quantize as Q
from tests.framework.fp8.errors import frob, rel
from framework.fp8.bf16_emulation import Bf16EmulatedLinear
from framework.models.deepseek_v3 import DeepSeekV3
from framework.models.deepseek_v3.moe import Experts, LocalDispatcher, MoE

# relative rms rounding error of one E4M3 operand (3 mantissa bits) on data spread over binades; derived in
# test_linear.test_error_against_full_precision_linear_is_in_the_fp8_range: 2^-3 / sqrt(12) * 0.736
EPS_E4M3 = 0.0265


def cfg(**kw):
    base = dict(name="deepseek_v3", vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=192, first_k_dense_replace=1, n_group=1, topk_group=1)
    base.update(kw)
    return ModelConfig(**base)


def make_moe(seed=0):
    """A MoE layer with K = 256 (two 128-tiles) into gate_up and K = 192 (a padded second tile) into down.

    gate/up pre-activations have std ~0.3: silu is close to its linear regime there, which the error estimate of
    test_fp8_moe_error_against_fp32_layer assumes."""
    torch.manual_seed(seed)
    c = cfg()
    moe = MoE(c)
    C, I = c.hidden_size, c.moe_intermediate_size
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.05)
        moe.experts.gate_up_proj.normal_(0, 0.3 / C ** 0.5)
        moe.experts.down_proj.normal_(0, 1 / I ** 0.5)
        for lin in (moe.shared_experts.gate_proj, moe.shared_experts.up_proj):
            lin.weight.normal_(0, 0.3 / C ** 0.5)
        moe.shared_experts.down_proj.weight.normal_(0, 1 / I ** 0.5)
    return moe


class Recorder:
    """Wraps an Experts linear_fn: keeps each GEMM's input and output, and the gradients that flow through them."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __call__(self, x, counts, weight, proj):
        y = self.inner(x, counts, weight, proj)
        rec = self.calls[proj] = {"x": x.detach().clone(), "counts": list(counts), "y": y.detach().clone()}
        y.register_hook(lambda g: rec.__setitem__("dy", g.detach().clone()))
        x.register_hook(lambda g: rec.__setitem__("dx", g.detach().clone()))
        return y


def deq_act(t):
    """The float64 value of t's FP8 copy in 1x128 tiles."""
    return Q.dequantize_act(*Q.quantize_act(t), dtype=torch.float64)


def deq_weight(w):
    return Q.dequantize_weight(*Q.quantize_weight(w.detach()), dtype=torch.float64)


def grouped64(x, counts, w):
    """Per-expert products of the dequantized FP8 operands, in float64: x [M, K], w [E, N, K] -> [M, N]."""
    xd, wd = deq_act(x), deq_weight(w)
    outs, s = [], 0
    for e, c in enumerate(counts):
        outs.append(xd[s:s + c] @ wd[e].t())
        s += c
    return torch.cat(outs)


def grads64(x, dy, counts, w):
    """The recipe's Dgrad and Wgrad per expert from the same FP8 operands (V3 §3.3), in float64."""
    xq, xs = Q.quantize_act(x)
    wd = deq_weight(w)
    dyd = deq_act(dy)  # 1x128 tiles of dY along N: per token, so one call covers every expert
    dx, dw, s = [], [], 0
    for e, c in enumerate(counts):
        dx.append(dyd[s:s + c] @ wd[e])
        # Wgrad re-tiles the cached FP8 input and dY along tokens (128x1), per expert
        xt = Q.dequantize_act(*Q.quantize_act_transposed(Q.dequantize_act(xq[s:s + c], xs[s:s + c])),
                              dtype=torch.float64)
        dyt = Q.dequantize_act(*Q.quantize_act_transposed(dy[s:s + c]), dtype=torch.float64)
        dw.append(dyt @ xt.t())
        s += c
    return torch.cat(dx), dw


def test_fp8_moe_layer_equals_float64_of_its_fp8_operands():
    moe = make_moe()
    names = convert_to_fp8(moe, backend="torch")
    assert names == ["experts", "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
    assert isinstance(moe.experts.linear_fn, Fp8ExpertGemms)
    rec = Recorder(moe.experts.linear_fn)
    moe.experts.linear_fn = rec
    shared_in = {}
    moe.shared_experts.down_proj.register_forward_hook(
        lambda m, args, out: shared_in.__setitem__("h", args[0].detach()))

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 128, 256, generator=g).requires_grad_()
    y = moe(x)
    dY = torch.randn(y.shape, generator=g)
    y.backward(dY)

    # forward: gate_up GEMM, the SwiGLU between, the down GEMM, the combine and the shared expert, all against
    # float64 products of the FP8 operands the layer quantized (each GEMM's input as the layer fed it)
    gu, dn = rec.calls["gate_up_proj"], rec.calls["down_proj"]
    counts = gu["counts"]
    assert sum(counts) == 2 * 128 * 2 and max(counts) > 128  # an expert with two 128-token Wgrad tiles
    flat = x.detach().reshape(-1, 256)
    idx, weight = moe.gate(flat)
    _, _, (token, w_sorted, n) = LocalDispatcher(4).dispatch(flat, idx, weight)
    assert torch.equal(gu["x"], flat[token])
    gu64 = grouped64(gu["x"], counts, moe.experts.gate_up_proj)
    assert rel(gu["y"], gu64) <= 1e-6
    g64, u64 = gu64.split(192, dim=-1)
    assert rel(dn["x"], F.silu(g64) * u64) <= 1e-6
    routed = torch.zeros(n, 256, dtype=torch.float64).index_add_(
        0, token, grouped64(dn["x"], counts, moe.experts.down_proj) * w_sorted.double()[:, None])
    sh = moe.shared_experts
    x64 = deq_act(flat)
    hs64 = F.silu(x64 @ deq_weight(sh.gate_proj.weight).t()) * (x64 @ deq_weight(sh.up_proj.weight).t())
    assert rel(shared_in["h"], hs64) <= 1e-6
    ref = routed + deq_act(shared_in["h"]) @ deq_weight(sh.down_proj.weight).t()
    assert rel(y.detach().reshape(-1, 256), ref) <= 1e-6

    # backward: Dgrad and Wgrad of both expert GEMMs from the gradients that reached them
    for proj, call in (("gate_up_proj", gu), ("down_proj", dn)):
        w = getattr(moe.experts, proj)
        dx64, dw64 = grads64(call["x"], call["dy"], counts, w)
        assert rel(call["dx"], dx64) <= 1e-6, proj
        for e, c in enumerate(counts):
            assert c == 0 or rel(w.grad[e], dw64[e]) <= 1e-6, (proj, e)
    assert x.grad is not None and moe.gate.weight.grad is not None  # the router (fp32) is trained too


def test_fp8_moe_error_against_fp32_layer():
    """The FP8 layer against the same layer in fp32, in relative Frobenius norm.

    Error budget, with eps = 0.0265 per E4M3-rounded operand (EPS_E4M3) and independent errors adding in
    quadrature: g and u each come from one GEMM with two rounded operands (sqrt(2) eps); near silu's linear regime
    h = silu(g) * u inherits both (2 eps); the down GEMM passes that on and rounds h and W_down again:
    sqrt(4 + 2) eps = 0.065. The shared expert has the same budget and the combine is a weighted sum of
    independent errors of similar size, so the layer output should be ~sqrt(6) eps (measured: 0.063). Bounds: +-15%.
    """
    ref = make_moe()
    fp8 = copy.deepcopy(ref)
    convert_to_fp8(fp8, backend="torch")
    x = torch.randn(2, 128, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = frob(fp8(x), ref(x))
    expected = 6 ** 0.5 * EPS_E4M3
    assert 0.85 * expected < err < 1.15 * expected, (err, expected)


class _RoundGrad(torch.autograd.Function):
    """Identity forward; the gradient is rounded to bf16 on its way back (as the emulation stores dY)."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.bfloat16).float()


def _bf16_value(t):
    """t rounded to bf16 in the forward, with an identity backward."""
    return t + (t.to(torch.bfloat16).float() - t).detach()


def test_bf16_emulated_experts_round_every_gemm_operand():
    """The hook equals the per-expert SwiGLU of bf16-rounded operands computed in fp32, forward and backward
    (where each GEMM's backward also sees its output gradient rounded to bf16)."""
    moe = make_moe(3)
    convert_to_bf16_emulation(moe)
    assert isinstance(moe.experts.linear_fn, Bf16ExpertGemms)
    assert isinstance(moe.shared_experts.down_proj, Bf16EmulatedLinear)
    ex = moe.experts
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 256, generator=g)
    counts = [20, 0, 31, 9]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ex(xa, torch.tensor(counts))
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    wgu = ex.gate_up_proj.detach().clone().requires_grad_()
    wd = ex.down_proj.detach().clone().requires_grad_()

    def gemm(a, w):
        return _RoundGrad.apply(F.linear(_bf16_value(a), _bf16_value(w)))

    outs, s = [], 0
    for e, c in enumerate(counts):
        gate, up = gemm(xb[s:s + c], wgu[e]).split(192, dim=-1)
        outs.append(gemm(F.silu(gate) * up, wd[e]))
        s += c
    yr = torch.cat(outs)
    yr.backward(dy)
    assert rel(y.detach(), yr.detach()) <= 1e-6
    for a, b in ((xa.grad, xb.grad), (ex.gate_up_proj.grad, wgu.grad), (ex.down_proj.grad, wd.grad)):
        assert rel(a, b) <= 1e-6
    assert torch.equal(ex.gate_up_proj.grad[1], torch.zeros_like(ex.gate_up_proj.grad[1]))  # expert without tokens


def tiny_model():
    torch.manual_seed(0)
    return DeepSeekV3(cfg(hidden_size=32, num_hidden_layers=3, moe_intermediate_size=16, n_routed_experts=8,
                          num_nextn_predict_layers=1, q_lora_rank=16, initializer_range=0.1))


def test_conversion_sets_expert_hooks_and_respects_exclusions():
    model = tiny_model()
    experts = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    assert experts == ["layers.1.mlp.experts", "layers.2.mlp.experts", "mtp.0.block.mlp.experts"]
    names = convert_to_fp8(model, exclude=["*lm_head*", "*gate", "mtp.*experts"], backend="torch")
    assert [n for n in names if n.endswith("experts")] == experts[:2]
    assert all(isinstance(model.get_submodule(n).linear_fn, Fp8ExpertGemms) for n in experts[:2])
    assert model.get_submodule(experts[2]).linear_fn is None
    assert isinstance(model.layers[1].mlp.shared_experts.gate_proj, Fp8Linear)
    assert type(model.lm_head) is torch.nn.Linear
    # without the pattern the MTP experts follow; what is converted already (hooks, Fp8Linear) is left alone
    assert convert_to_fp8(model, exclude=["*lm_head*", "*gate"], backend="torch") == [experts[2]]
    assert convert_to_fp8(model, exclude=["*lm_head*", "*gate"], backend="torch") == []

    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(5))
    loss, _ = model.compute_loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    stats = collect_fp8_stats(model, reset=False)
    for e in experts:
        for proj in ("gate_up_proj", "down_proj"):
            assert stats[f"fp8/{e}.{proj}/dy_amax"] > 0  # the expert GEMMs ran in FP8, backward included
    summary = fp8_metrics(model)
    n_linear = sum(isinstance(m, Fp8Linear) for m in model.modules())
    assert summary["fp8/sites"] == n_linear + 2 * len(experts)

    bf = tiny_model()
    done = convert_to_bf16_emulation(bf, exclude=["*lm_head*", "*gate", "layers.2.*"])
    assert isinstance(bf.layers[1].mlp.experts.linear_fn, Bf16ExpertGemms) and "layers.1.mlp.experts" in done
    assert bf.layers[2].mlp.experts.linear_fn is None and type(bf.layers[2].self_attn.o_proj) is torch.nn.Linear
    assert convert_to_bf16_emulation(bf, exclude=["*lm_head*", "*gate", "layers.2.*"]) == []


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="proj"):
        Fp8ExpertGemms(backend="torch")(torch.randn(2, 8), [2], torch.randn(1, 4, 8), "up_proj")
    with pytest.raises(ValueError, match="backend"):
        Fp8ExpertGemms(backend="gpu")
    with pytest.raises(ValueError, match="exclude"):
        convert_to_bf16_emulation(tiny_model(), exclude="*gate")
