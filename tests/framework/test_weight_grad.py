"""Every layer kind's weight gradient, deferred to W, equals the gradient computed at once, and the deferring
Functions equal plain autograd.

Deferred vs immediate runs the same closure, later: bitwise. Against autograd's own backward (nn.Linear, F.embedding,
x * w, torch._grouped_mm, per-expert F.linear, einsum) the math is the same but the kernels may sum in another order:
float64 within 1e-12 of the gradient's largest entry, or bitwise where the same kernel runs.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.weight_grad import (SplitEmbedding, SplitLinear, WeightGradStore, grouped_linear, run_weight_grads,
                                   scale, weight_einsum)
from tests.conftest import compose_cfg


def backward(module: nn.Module, forward, defer: bool):
    """Run forward() and back-propagate a fixed probe with the store enabled or not. Returns (names of the
    parameters whose .grad B wrote, {name: gradient} after the deferred closures ran, their count)."""
    for p in module.parameters():
        p.grad = None
    WeightGradStore.clear()
    WeightGradStore.enabled = defer
    try:
        out = forward()
        probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        out.backward(probe)
    finally:
        WeightGradStore.enabled = False
    in_b = {n for n, p in module.named_parameters() if p.grad is not None}
    funcs = WeightGradStore.take_cache()
    for f in funcs:
        f()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    assert not any(g.requires_grad for g in grads.values())  # a W builds no graph
    return in_b, grads, len(funcs)


def assert_deferred_equals_immediate(module: nn.Module, forward, min_closures: int = 1):
    in_b_now, now, _ = backward(module, forward, defer=False)
    in_b, later, n = backward(module, forward, defer=True)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert in_b_now == trainable and now.keys() == trainable
    assert in_b == set(), f"written in B although deferred: {sorted(in_b)}"
    assert n >= min_closures
    assert later.keys() == now.keys()
    for name in now:
        assert torch.equal(later[name], now[name]), name


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    return float((a - b).abs().max()) <= tol * float(b.abs().max())


# ---------------------------------------------------------------------------------------------------- single ops
def test_linear_embedding_scale_match_autograd_and_defer():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    lin, ref = SplitLinear(8, 4).double(), nn.Linear(8, 4).double()
    ref.load_state_dict(lin.state_dict())
    assert_deferred_equals_immediate(lin, lambda: lin(x))
    _, got, _ = backward(lin, lambda: lin(x), defer=True)
    _, want, _ = backward(ref, lambda: ref(x), defer=False)
    assert close(got["weight"], want["weight"]) and close(got["bias"], want["bias"])

    ids = torch.randint(0, 7, (4, 6))  # repeated ids: rows summed
    emb = SplitEmbedding(7, 5).double()
    assert_deferred_equals_immediate(emb, lambda: emb(ids))
    _, got, _ = backward(emb, lambda: emb(ids), defer=True)
    plain = nn.Embedding(7, 5).double()
    plain.load_state_dict(emb.state_dict())
    _, want, _ = backward(plain, lambda: plain(ids), defer=False)
    assert torch.equal(got["weight"], want["weight"])  # the kernel autograd runs for F.embedding

    norm = nn.Module()
    norm.weight = nn.Parameter(torch.randn(8, dtype=torch.float64))
    assert_deferred_equals_immediate(norm, lambda: scale(x, norm.weight))
    _, got, _ = backward(norm, lambda: scale(x, norm.weight), defer=True)
    _, want, _ = backward(norm, lambda: x * norm.weight, defer=False)
    assert torch.equal(got["weight"], want["weight"])


def test_a_weight_used_thrice_gets_autograds_bits_when_deferred_onto_an_existing_grad():
    """A linear called three times in one chunk (a tied head), on top of the gradient of an earlier chunk: autograd
    adds the three contributions up, then accumulates once; run_weight_grads must round the same way."""
    torch.manual_seed(0)
    lin = SplitLinear(48, 48)
    other = SplitLinear(48, 48)                          # a weight used once, between the tied calls
    probe = torch.randn(16, 48)
    fwd = lambda x: ((lin(torch.tanh(other(lin(x)))) + lin(x * 0.5)) * probe).sum()  # noqa: E731
    chunks = [torch.randn(16, 48) for _ in range(3)]
    params = [lin.weight, lin.bias, other.weight, other.bias]

    def grads(defer: bool, run) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for x in chunks:                                 # .grad of the first chunk is already there for the others
            WeightGradStore.clear()
            WeightGradStore.enabled = defer
            fwd(x).backward()
            WeightGradStore.enabled = False
            funcs = WeightGradStore.take_cache()
            assert len(funcs) == (4 if defer else 0)     # lin 3 times, other once
            run(funcs)
        return [p.grad.clone() for p in params]

    want = grads(False, lambda funcs: None)
    finished = []
    got = grads(True, lambda funcs: run_weight_grads(funcs, finished.append))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # each chunk: other's weights are final after its own closure, lin's after its first call's (B's last) closure
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert [ids(ps) for ps in finished[:2]] == [ids(params[2:]), ids(params[:2])]
    assert len(finished) == 2 * len(chunks)
    # accumulating each contribution in turn, as a closure alone does, rounds differently: the test can tell
    naive = grads(True, lambda funcs: [f() for f in funcs])
    assert not torch.equal(naive[0], want[0])


def test_run_weight_grads_runs_a_users_closure_in_turn_and_reports_shared_weights_once_final():
    """A closure written against deepseek-ai/DualPipe's store (no `gradients`) simply runs, in its turn; a weight it
    shares with one of ours is final after the last closure that writes it."""
    torch.manual_seed(0)
    lin = SplitLinear(8, 8)
    x, probe = torch.randn(4, 8), torch.randn(4, 8)
    extra = torch.randn(8, 8)
    order = []

    def user():                                          # a user's layer adding its own gradient to lin.weight
        order.append("user")
        lin.weight.grad += extra
    user.params = (lin.weight,)

    lin.weight.grad = torch.ones(8, 8)                   # an earlier chunk's gradient
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    (lin(x) * probe).sum().backward()
    WeightGradStore.enabled = False
    ours = WeightGradStore.take_cache()
    finished = []
    run_weight_grads([*ours, user], lambda ps: finished.append([id(p) for p in ps]))
    want = torch.ones(8, 8) + probe.t() @ x + extra      # ours first, then the user's, in closure order
    assert torch.allclose(lin.weight.grad, want, atol=1e-5) and order == ["user"]
    assert finished == [[id(lin.bias)], [id(lin.weight)]]  # the bias with ours, the weight after the user's


def test_split_linear_under_autocast_runs_as_nn_linear():
    """autocast casts a plain linear's operands but not a custom Function's: SplitLinear then runs as nn.Linear,
    bit for bit, and leaves nothing to W."""
    torch.manual_seed(0)
    lin, ref = SplitLinear(16, 8), nn.Linear(16, 8)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(4, 16)
    grads = []
    for m, defer in ((lin, True), (ref, False)):
        WeightGradStore.clear()
        WeightGradStore.enabled = defer
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        WeightGradStore.enabled = False
        assert WeightGradStore.take_cache() == []
        grads.append((y, m.weight.grad, m.bias.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("path", ["grouped", "loop"])
def test_grouped_linear_matches_autograd_and_defers(path):
    torch.manual_seed(0)
    counts = [3, 0, 5, 2]                                         # an expert without tokens included
    dtype = torch.float32 if path == "grouped" else torch.float64
    x = torch.randn(sum(counts), 16, dtype=dtype)
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(4, 8, 16, dtype=dtype))
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    fwd = ((lambda: grouped_linear(x, m.weight, offs=offs)) if path == "grouped"
           else (lambda: grouped_linear(x, m.weight, counts=counts)))
    assert_deferred_equals_immediate(m, fwd)
    _, got, _ = backward(m, fwd, defer=True)
    if path == "grouped":   # torch._grouped_mm's own backward: the same kernels
        _, want, _ = backward(m, lambda: torch._grouped_mm(x, m.weight.transpose(1, 2), offs=offs), defer=False)
        assert torch.equal(got["weight"], want["weight"])
    else:                   # one F.linear per expert, as the loop path used to run
        def per_expert():
            outs, start = [], 0
            for e, n in enumerate(counts):
                outs.append(F.linear(x[start:start + n], m.weight[e]))
                start += n
            return torch.cat(outs)
        _, want, _ = backward(m, per_expert, defer=False)
        assert close(got["weight"], want["weight"])


def test_weight_einsum_matches_einsum_and_defers():
    torch.manual_seed(0)
    H, dn, dv, r = 2, 3, 4, 5
    m = nn.Module()
    m.weight = nn.Parameter(torch.randn(H * (dn + dv), r, dtype=torch.float64))
    q = torch.randn(2, 3, H, dn, dtype=torch.float64)
    uk = lambda w: w.view(H, dn + dv, r)[:, :dn]
    assert_deferred_equals_immediate(m, lambda: weight_einsum("bthd,hdr->bthr", q, m.weight, uk))
    _, got, _ = backward(m, lambda: weight_einsum("bthd,hdr->bthr", q, m.weight, uk), defer=True)
    _, want, _ = backward(m, lambda: torch.einsum("bthd,hdr->bthr", q, uk(m.weight)), defer=False)
    assert close(got["weight"], want["weight"])
    assert got["weight"].view(H, dn + dv, r)[:, dn:].abs().max() == 0   # the value half is untouched


# ---------------------------------------------------------------------------------------------------- layer kinds
def tiny_cfg(**extra):
    over = {"model": "deepseek_v3_tiny", "data.vocab_size": 300, "train.seq_len": 8,
            "model.max_position_embeddings": 16, "model.hidden_size": 128, "model.num_hidden_layers": 2,
            "model.moe_intermediate_size": 32, "model.first_k_dense_replace": 1, "model.intermediate_size": 64}
    over.update(extra)
    return compose_cfg(*[f"{k}={v}" for k, v in over.items()])


def tiny_model(dtype, precision="full", **extra):
    from framework.models import build_model
    from schedules.weight_grad import enable_weight_grad_split, undeferred_weights

    torch.manual_seed(0)
    model = build_model(tiny_cfg(**extra).model).to(dtype)
    if precision == "fp8":
        from framework.fp8 import convert_to_fp8
        assert convert_to_fp8(model, backend="torch")
    elif precision == "bf16_emulated":
        from framework.fp8.bf16_emulation import convert_to_bf16_emulation
        assert convert_to_bf16_emulation(model)
    assert enable_weight_grad_split(model) > 0
    assert undeferred_weights(model) == []
    return model


def kinds(model) -> set[str]:
    return {type(m).__name__ + ("" if getattr(m, "linear_fn", None) is None else f"/{type(m.linear_fn).__name__}")
            for m in model.modules() if any(True for _ in m.parameters(recurse=False))}


@pytest.mark.parametrize("dtype,precision,impl,attn", [
    (torch.float64, "full", "loop", "naive"),
    (torch.float64, "full", "loop", "absorb"),
    (torch.float32, "full", "grouped", "absorb"),
    (torch.float32, "fp8", "grouped", "naive"),
    (torch.float32, "bf16_emulated", "grouped", "naive"),
])
def test_every_weight_of_deepseek_v3_defers(dtype, precision, impl, attn):
    """The whole model with MTP, every layer kind it has: B writes no weight gradient, W writes them all, equal to
    the immediate backward bit for bit."""
    model = tiny_model(dtype, precision, **{"model.expert_impl": impl, "model.attn_impl": attn})
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g)
    expected = {"SplitEmbedding", "RMSNorm", "Router"}
    expected |= ({"Fp8Linear", "Experts/Fp8ExpertGemms"} if precision == "fp8" else
                 {"Bf16EmulatedLinear", "Experts/Bf16ExpertGemms"} if precision == "bf16_emulated" else
                 {"SplitLinear", "Experts"})
    assert expected <= kinds(model), kinds(model)
    assert_deferred_equals_immediate(model, lambda: model.compute_loss(x, y)[0], min_closures=20)


def test_dense_model_defers_and_absorbed_mla_equals_naive():
    from framework.models import build_model
    from schedules.weight_grad import enable_weight_grad_split, undeferred_weights

    cfg = compose_cfg("model=dense", "data.vocab_size=50", "model.hidden_size=16", "model.num_hidden_layers=2",
                      "model.num_attention_heads=2", "model.intermediate_size=24", "model.tie_word_embeddings=true")
    torch.manual_seed(0)
    dense = build_model(cfg.model).double()
    enable_weight_grad_split(dense)
    assert undeferred_weights(dense) == []
    x = torch.randint(0, 50, (2, 8))
    # the tied embedding / head weight gets two closures, both deferred
    assert_deferred_equals_immediate(dense, lambda: dense.compute_loss(x, x)[0])

    # absorbed MLA (kv_b_proj's halves used per head) and naive MLA give the same gradients, deferred
    naive, absorb = (tiny_model(torch.float64, **{"model.expert_impl": "loop", "model.attn_impl": a})
                     for a in ("naive", "absorb"))
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, 300, (2, 8), generator=g), torch.randint(0, 300, (2, 8), generator=g)
    _, want, _ = backward(naive, lambda: naive.compute_loss(ids, labels)[0], defer=True)
    _, got, _ = backward(absorb, lambda: absorb.compute_loss(ids, labels)[0], defer=True)
    assert got.keys() == want.keys()
    for name in want:
        assert close(got[name], want[name], 1e-10), name


def test_layers_that_cannot_defer_are_named():
    from schedules.weight_grad import undeferred_weights

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    class PlainGemms:  # a user's expert GEMMs that say nothing about their weight gradient
        def __call__(self, x, counts, weight, proj):
            return x

    model = tiny_model(torch.float32)
    model.extra = Custom()
    model.layers[1].mlp.experts.linear_fn = PlainGemms()
    model.norm.weight.requires_grad_(False)  # frozen weights need no W
    assert undeferred_weights(model) == ["layers.1.mlp.experts (Experts)", "extra (Custom)"]
