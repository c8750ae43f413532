"""DeepSeek-V3 model: every fast path against its reference (absorbed MLA vs naive, grouped experts vs loop, cached
and self-drafted generation vs the plain greedy loop), router invariants, MTP alignment, parameter counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from framework.config import ModelConfig
from framework.models.deepseek_v3 import DeepSeekV3, count_parameters
from framework.models.deepseek_v3.generate import generate
from framework.models.deepseek_v3.mla import MLA, LatentCache, RotaryTables, apply_rotary
from framework.models.deepseek_v3.moe import Experts, LocalDispatcher, MoE, Router
from framework.models.deepseek_v3.mtp import depth_inputs

CONF = Path(__file__).resolve().parents[3] / "conf" / "model"


def tiny(**kw) -> ModelConfig:
    base = dict(name="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, q_lora_rank=16, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=2, topk_group=1,
                num_nextn_predict_layers=1, initializer_range=0.1)
    base.update(kw)
    return ModelConfig(**base)


def randomize_biases(model: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.e_score_correction_bias.normal_(0, std)


# ---------------------------------------------------------------------------------------------------------------- MLA

def test_interleaved_rope_is_a_complex_rotation_of_pairs():
    """DeepSeek rotates pairs (x0, x1), (x2, x3), ... as complex numbers; we list the real parts, then the imaginary."""
    torch.manual_seed(0)
    rot = RotaryTables(8, 16, 10000.0)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    cos, sin = rot.tables(0, 16, x.device)
    z = torch.view_as_complex(x.view(2, 3, 16, 4, 2).contiguous()) * torch.complex(cos.double(), sin.double())
    want = torch.cat((z.real, z.imag), dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin, interleaved=True), want, rtol=0, atol=1e-12)
    # split layout (interleaved=False) rotates pairs (i, i + d/2)
    half = apply_rotary(x, cos, sin, interleaved=False)
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(half, torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("q_lora_rank,scaling", [(16, None), (None, {"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 16, "mscale": 1.0,
                                                 "mscale_all_dim": 0.8})])
def test_absorbed_mla_equals_naive(q_lora_rank, scaling):
    torch.manual_seed(0)
    cfg = tiny(q_lora_rank=q_lora_rank, rope_scaling=scaling)
    rot = RotaryTables(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta, scaling)
    naive = MLA(cfg, rot)
    for p in naive.parameters():
        torch.nn.init.normal_(p, std=0.3)
    absorbed = MLA(tiny(q_lora_rank=q_lora_rank, rope_scaling=scaling, attn_impl="absorb"), rot)
    absorbed.load_state_dict(naive.state_dict())
    x = torch.randn(2, 10, cfg.hidden_size)
    # fp32: the two paths round differently but agree to 1e-5
    assert (naive(x) - absorbed(x)).abs().max().item() <= 1e-5
    # float64: equal up to rounding, also when decoding step by step through the latent cache
    naive.double(), absorbed.double(), rot.double()
    x = x.double()
    full = naive(x)
    torch.testing.assert_close(absorbed(x), full, rtol=0, atol=1e-12)
    for mla in (naive, absorbed):
        cache = LatentCache()
        steps = [mla(x[:, :4], 0, cache)] + [mla(x[:, t:t + 1], t, cache) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-12)
        assert cache.latent.shape == (2, 10, cfg.kv_lora_rank) and cache.rope_key.shape == (2, 10, cfg.qk_rope_head_dim)


def test_mla_is_causal():
    torch.manual_seed(0)
    cfg = tiny(expert_impl="loop")
    model = DeepSeekV3(cfg).double().eval()
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 64
    torch.testing.assert_close(model(x)[:, :7], model(y)[:, :7], rtol=0, atol=1e-12)
    assert (model(x)[:, 7:] - model(y)[:, 7:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------ experts

def test_grouped_experts_equal_loop_forward_and_backward():
    torch.manual_seed(0)
    cfg = tiny()
    grouped, loop = Experts(cfg), Experts(tiny(expert_impl="loop"))
    for p in grouped.parameters():
        torch.nn.init.normal_(p, std=0.3)
    loop.load_state_dict(grouped.state_dict())
    counts = torch.tensor([3, 0, 5, 1, 0, 7, 2, 4])                        # empty experts included
    x = torch.randn(int(counts.sum()), cfg.hidden_size)
    xg, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yg, yl = grouped(xg, counts), loop(xl, counts.tolist())
    assert (yg - yl).abs().max().item() <= 1e-5
    g = torch.randn_like(yg)
    (yg * g).sum().backward()
    (yl * g).sum().backward()
    assert (xg.grad - xl.grad).abs().max().item() <= 1e-5
    for a, b in zip(grouped.parameters(), loop.parameters()):
        assert (a.grad - b.grad).abs().max().item() <= 1e-5
    assert grouped.gate_up_proj.grad[1].abs().sum() == 0 and grouped.down_proj.grad[4].abs().sum() == 0
    grouped(xg, counts).sum().backward()  # an expanded (stride-0) incoming gradient is accepted too


def test_grouped_experts_fall_back_where_grouped_mm_does_not_apply():
    """float64 and widths that break grouped_mm's 16-byte strides run per expert: same results as the loop."""
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 2, 0, 0, 1, 0, 0])
    for cfg, dtype in ((tiny(), torch.float64), (tiny(moe_intermediate_size=18), torch.float32)):
        grouped, loop = Experts(cfg).to(dtype), Experts(ModelConfig(**{**vars(cfg), "expert_impl": "loop"})).to(dtype)
        torch.nn.init.normal_(grouped.gate_up_proj), torch.nn.init.normal_(grouped.down_proj)
        loop.load_state_dict(grouped.state_dict())
        x = torch.randn(6, 32, dtype=dtype)
        assert not grouped.grouped_mm_applies(x)
        assert torch.equal(grouped(x, counts), loop(x, counts))
    assert Experts(tiny()).grouped_mm_applies(torch.zeros(1, 32))
    assert Experts(tiny()).grouped_mm_applies(torch.zeros(1, 32, dtype=torch.bfloat16))


def test_moe_equals_per_token_reference_and_expert_slices():
    """MoE(x)_t = shared(x_t) + sum_k w_tk expert_{i_tk}(x_t) in float64; a slice of experts computes its rows alike."""
    torch.manual_seed(0)
    cfg = tiny(expert_impl="loop")
    moe = MoE(cfg).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    idx, w = moe.gate(x.view(10, -1))
    ex = moe.experts
    want = moe.shared_experts(x.view(10, -1)).clone()
    for t in range(10):
        for k in range(cfg.num_experts_per_tok):
            e = idx[t, k].item()
            gate, up = F.linear(x.view(10, -1)[t], ex.gate_up_proj[e]).split(cfg.moe_intermediate_size)
            want[t] += w[t, k] * F.linear(F.silu(gate) * up, ex.down_proj[e])
    torch.testing.assert_close(moe(x).view(10, -1), want, rtol=0, atol=1e-12)
    # dispatch groups rows by expert; an owner of experts 4..7 computes exactly those rows
    x_sorted, counts, ctx = LocalDispatcher(8).dispatch(x.view(10, -1), idx, w)
    y_sorted = ex(x_sorted, counts)
    part = Experts(cfg, local_experts=range(4, 8)).double()
    part.gate_up_proj.data.copy_(ex.gate_up_proj[4:]), part.down_proj.data.copy_(ex.down_proj[4:])
    first = int(counts[:4].sum())
    torch.testing.assert_close(part(x_sorted[first:], counts[4:]), y_sorted[first:], rtol=0, atol=1e-12)
    partial = MoE(cfg, local_experts=range(4, 8))
    with pytest.raises(ValueError, match="local_experts"):
        partial(x.float())


# ------------------------------------------------------------------------------------------------------------- router

def _reference_choice(s: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int):
    """Per-token noaux_tc choice written out with Python loops (HF's rule): best groups by top-2 biased sum."""
    out = []
    E = s.shape[1]
    for row in (s + bias).tolist():
        groups = [row[g * E // n_group:(g + 1) * E // n_group] for g in range(n_group)]
        gscore = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        cands = [(row[e], e) for e in range(E) if e // (E // n_group) in keep]
        out.append(sorted(e for _, e in sorted(cands, reverse=True)[:k]))
    return out


def test_router_choice_and_weights():
    torch.manual_seed(0)
    cfg = tiny(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    for bias_std in (0.0, 0.3):
        r.e_score_correction_bias.normal_(0, bias_std) if bias_std else r.e_score_correction_bias.zero_()
        r.load.zero_()
        idx, w = r(x)
        s = torch.sigmoid(x @ r.weight.T)
        want = _reference_choice(s, r.e_score_correction_bias, 4, 2, 4)
        assert [sorted(row) for row in idx.tolist()] == want
        # weights: unbiased affinities of the picked experts, normalized, times the scaling factor
        picked = s.gather(1, idx)
        torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5), rtol=1e-6, atol=1e-6)
        assert max(len({e // 4 for e in row}) for row in idx.tolist()) <= 2     # within topk_group groups
        assert torch.equal(r.load, torch.bincount(idx.flatten(), minlength=16))
    # a large bias on expert 3 makes everyone pick it; its weight still comes from its unbiased affinity
    r.e_score_correction_bias.zero_()
    r.e_score_correction_bias[3] = 10.0
    idx, w = r(x)
    assert (idx == 3).any(-1).all()
    picked = s.gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True) * 2.5, rtol=1e-6, atol=1e-6)
    assert "e_score_correction_bias" in dict(r.named_buffers()) and "e_score_correction_bias" in r.state_dict()
    assert "e_score_correction_bias" not in dict(r.named_parameters()) and "load" not in r.state_dict()


def test_router_softmax_unnormalized_and_fp32_under_bf16():
    torch.manual_seed(0)
    cfg = tiny(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, n_group=1, topk_group=1)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    x = torch.randn(20, cfg.hidden_size)
    idx, w = r(x)
    p = torch.softmax(x @ r.weight.T, -1)
    torch.testing.assert_close(w, p.gather(1, idx))                       # raw softmax probabilities, scale 1
    assert torch.equal(idx.sort(-1)[0], p.topk(2, -1)[1].sort(-1)[0])
    model = DeepSeekV3(tiny()).to(torch.bfloat16)
    gates = [m for m in model.modules() if isinstance(m, Router)]
    assert all(g.weight.dtype == torch.float32 and g.e_score_correction_bias.dtype == torch.float32 for g in gates)
    assert model.embed.weight.dtype == torch.bfloat16
    logits = model(torch.randint(0, 64, (1, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ------------------------------------------------------------------------------------------------------- MTP and loss

def test_mtp_targets_are_aligned():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    labels = torch.tensor([[11, 12, 13, 14, 15, -100]])                    # next token; last one unknown
    inp1, tgt1 = depth_inputs(ids, labels, 1)
    assert inp1.tolist() == [[11, 12, 13, 14, 15, 0]]                       # t_{i+1}
    assert tgt1.tolist() == [[12, 13, 14, 15, -100, -100]]                  # t_{i+2}
    inp2, tgt2 = depth_inputs(ids, labels, 2)
    assert inp2.tolist() == [[12, 13, 14, 15, 0, 0]] and tgt2.tolist() == [[13, 14, 15, -100, -100, -100]]


def test_loss_is_main_plus_lambda_mtp_with_the_right_targets():
    torch.manual_seed(0)
    cfg = tiny(num_nextn_predict_layers=2, expert_impl="loop")
    model = DeepSeekV3(cfg).double()
    randomize_biases(model)
    ids = torch.randint(0, 64, (2, 10))
    labels = torch.cat((ids[:, 1:], torch.full((2, 1), -100)), 1)
    loss, metrics = model.compute_loss(ids, labels)
    # reference written out: depth k reads t_{i+k} and predicts t_{i+k+1}
    h = model.norm(model.hidden_states(ids))
    main = F.cross_entropy(model.lm_head(h).flatten(0, 1), labels.flatten(), ignore_index=-100)
    per_depth = []
    for k in (1, 2):
        nxt = torch.zeros_like(ids)
        nxt[:, :10 - k] = ids[:, k:]
        h = model.mtp[k - 1](h, model.embed(nxt))
        logits = model.lm_head(h)[:, :10 - k - 1]                           # positions with a known t_{i+k+1}
        per_depth.append(F.cross_entropy(logits.flatten(0, 1), ids[:, k + 1:].flatten()))
    mtp = sum(per_depth) / 2
    torch.testing.assert_close(metrics["loss/main"], main.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics["loss/mtp"], mtp.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, main + 0.3 * mtp, rtol=0, atol=1e-12)
    # an off-by-one (depth 1 fed t_i instead of t_{i+1}) gives a different loss
    wrong = model.lm_head(model.mtp[0](model.norm(model.hidden_states(ids)), model.embed(ids)))[:, :8]
    assert abs(F.cross_entropy(wrong.flatten(0, 1), ids[:, 2:].flatten()).item() - per_depth[0].item()) > 1e-6
    model.set_progress(0.5)
    assert model.mtp_lambda == 0.3
    model.set_progress(0.71)
    assert model.mtp_lambda == 0.1
    assert torch.allclose(model.compute_loss(ids, labels)[0], main + 0.1 * mtp, rtol=0, atol=1e-12)


def test_backward_reaches_every_parameter_with_finite_grads():
    torch.manual_seed(0)
    cfg = tiny(seq_aux_loss_alpha=1e-3, aux_loss_alpha=1e-3, n_routed_experts=4, n_group=1, topk_group=1)
    model = DeepSeekV3(cfg)
    randomize_biases(model)
    ids = torch.randint(0, 64, (2, 16))
    loss, metrics = model.compute_loss(ids, torch.roll(ids, -1, 1))
    assert set(metrics) == {"loss/main", "loss/mtp", "loss/balance", "loss/total"}
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # the bias is a buffer: untouched by backward, not in parameters()
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------- generate

def _copying_mtp(model: DeepSeekV3) -> None:
    """Make MTP depth 1 repeat the main model's prediction (its block adds 0, eh_proj passes hnorm(h) through):
    the draft for t_{n+2} is then the main model's t_{n+1}, right exactly when the text repeats a token."""
    C = model.config.hidden_size
    d = model.mtp[0]
    with torch.no_grad():
        d.eh_proj.weight.zero_()
        d.eh_proj.weight[:, C:] = torch.eye(C)
        d.block.self_attn.o_proj.weight.zero_()
        d.block.mlp.experts.down_proj.zero_()
        d.block.mlp.shared_experts.down_proj.weight.zero_()


@pytest.mark.parametrize("attn_impl", ["naive", "absorb"])
def test_generation_with_cache_and_mtp_draft_matches_plain_greedy(attn_impl):
    torch.manual_seed(7)  # a model whose greedy text repeats tokens now and then, so drafts are sometimes right
    cfg = tiny(attn_impl=attn_impl, expert_impl="loop", initializer_range=0.3, num_hidden_layers=2)
    model = DeepSeekV3(cfg).double().eval()
    randomize_biases(model)
    _copying_mtp(model)
    prompt = torch.randint(0, 64, (1, 6))
    ref, _ = generate(model, prompt, 24, use_cache=False)
    assert ref.shape == (1, 30)
    for use_cache in (True, False):
        for draft in (False, True):
            out, stats = generate(model, prompt, 24, use_cache=use_cache, use_mtp_draft=draft)
            assert torch.equal(out, ref), (use_cache, draft)
            if draft:  # both outcomes of verification were exercised
                assert 0 < stats["draft_accepted"] < stats["draft_proposed"]
                assert stats["main_forwards"] == 1 + stats["draft_proposed"] < 24
                assert stats["acceptance_rate"] == stats["draft_accepted"] / stats["draft_proposed"]
    batch = torch.randint(0, 64, (3, 5))
    out, _ = generate(model, batch, 6)
    for b in range(3):
        assert torch.equal(out[b:b + 1], generate(model, batch[b:b + 1], 6, use_cache=False)[0])


def test_sampling_is_reproducible_and_limits_are_checked():
    torch.manual_seed(0)
    model = DeepSeekV3(tiny()).eval()
    prompt = torch.randint(0, 64, (1, 4))
    a, _ = generate(model, prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b, _ = generate(model, prompt, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, prompt, 61)
    with pytest.raises(ValueError, match="batch size"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), 2, use_mtp_draft=True)


# ------------------------------------------------------------------------------------------------ counts and presets

def _preset(name: str, vocab: int = 4096):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"deepseek_v3_{name}.yaml"))
    if name != "671b":
        cfg.vocab_size = vocab
    return cfg


def test_671b_parameter_counts_without_allocating():
    cfg = _preset("671b")
    total, activated = count_parameters(cfg)
    # closed form (V3 shapes): attention per layer, dense FFN, experts, gate, embedding and head
    C, H, V = 7168, 128, 129280
    attn = C * 1536 + 1536 + 1536 * H * 192 + C * 576 + 512 + 512 * H * 256 + H * 128 * C + 2 * C
    expert = 3 * C * 2048
    dense_layer = attn + 3 * C * 18432
    moe_layer = attn + 257 * expert + 256 * C
    want_total = 2 * V * C + C + 3 * dense_layer + 58 * moe_layer
    want_activated = V * C + C + 3 * dense_layer + 58 * (attn + 9 * expert + 256 * C)
    assert (total, activated) == (want_total, want_activated)
    assert abs(total / 671e9 - 1) < 0.001                                   # 671.03B
    assert abs(activated / 37e9 - 1) < 0.011                                # 36.63B without the embedding lookup
    mtp_total, _ = count_parameters(cfg, include_mtp=True)
    assert mtp_total - total == 2 * C * C + 3 * C + moe_layer               # the MTP depth's own 11.6B


def test_presets_build_and_flops():
    cfg = _preset("tiny", vocab=512)
    assert "vocab_size" not in OmegaConf.load(CONF / "deepseek_v3_tiny.yaml")
    assert "vocab_size" not in OmegaConf.load(CONF / "deepseek_v3_small.yaml")
    model = DeepSeekV3(cfg)
    total, activated = count_parameters(cfg)
    assert total == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    # flops = 6 * (activated + D * head) + 6 * T * H * (dqk + dv) per attention layer (main + MTP)
    _, act_all = count_parameters(cfg, include_mtp=True)
    T = 128
    want = 6 * (act_all + 512 * 128) + 5 * 6 * T * 4 * (48 + 32)
    assert model.flops_per_token(T) == pytest.approx(want, rel=1e-12)
    small_total, small_act = count_parameters(_preset("small"))
    assert 2e8 < small_total < 8e8 and small_act < small_total / 4
    for bad, key in (({"attn_impl": "flash"}, "model.attn_impl"), ({"expert_impl": "x"}, "model.expert_impl"),
                     ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "model.rope_scaling.type"),
                     ({"topk_group": 3}, "model.topk_group")):
        with pytest.raises(ValueError, match=key):
            DeepSeekV3(tiny(**bad))
