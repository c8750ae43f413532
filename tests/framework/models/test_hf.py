"""Hugging Face interop: logits parity with transformers' DeepseekV3ForCausalLM in both directions, MTP parity with
transformers' MtpModel, exact load/save round trips, FP8 block dequantization, config errors."""
from __future__ import annotations

import dataclasses

import json
import math
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from framework.models import from_pretrained, save_pretrained
from framework.models.deepseek_v3.mla import rope_parameters
from framework.models.hf import dequantize_fp8, duet_to_hub_tensors

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()  # its load reports list every MTP key it skips

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
CONFIGS = {
    # query compression, YaRN, 4 groups of which 2 per token, one dense layer, 2 shared experts
    "qlora_yarn_groups": dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, n_routed_experts=8,
                              num_experts_per_tok=3, n_shared_experts=2, num_hidden_layers=3, rope_parameters=YARN),
    # no query compression, no groups, every layer MoE, tied embeddings
    "plain_tied": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0, n_routed_experts=4,
                       num_experts_per_tok=2, n_shared_experts=1, num_hidden_layers=2, tie_word_embeddings=True),
    # two dense layers then MoE; the checkpoint also carries an MTP depth (sharded, with an index)
    "dense_first_mtp": dict(q_lora_rank=16, n_group=2, topk_group=1, first_k_dense_replace=2, n_routed_experts=8,
                            num_experts_per_tok=2, n_shared_experts=1, num_hidden_layers=3),
}


def hf_model(**kw) -> DeepseekV3ForCausalLM:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=4,
                num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                max_position_embeddings=64)
    base.update(kw)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**base)).eval()
    with torch.no_grad():  # far from the default init so routing decisions are well separated
        for n, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in n else p.normal_(0.0, 0.15)
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0.0, 0.1)
    return model


def add_mtp_shard(folder: str, n_layers: int) -> None:
    """Add an MTP depth (layer n_layers, hub names, random values): two shards and an index, as on the hub."""
    ours = from_pretrained(folder, num_nextn_predict_layers=0)
    cfg = ours.config
    from framework.models.deepseek_v3 import DeepSeekV3
    donor = DeepSeekV3(dataclasses.replace(cfg, num_nextn_predict_layers=1, initializer_range=0.15))
    with torch.no_grad():
        for n, b in donor.named_buffers():
            if "e_score_correction_bias" in n:
                b.normal_(0.0, 0.1)
        for n, p in donor.named_parameters():
            if "mtp" in n and "norm" in n:
                p.normal_(1.0, 0.1)
    mtp = {k: v for k, v in duet_to_hub_tensors(donor).items() if k.startswith(f"model.layers.{n_layers}.")}
    # DeepSeek's checkpoints also repeat the shared embedding and head inside the MTP layer
    mtp[f"model.layers.{n_layers}.embed_tokens.weight"] = donor.embed.weight.detach().clone()
    mtp[f"model.layers.{n_layers}.shared_head.head.weight"] = donor.lm_head.weight.detach().clone()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(mtp, os.path.join(folder, second), metadata={"format": "pt"})
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, first))
    main = load_file(os.path.join(folder, first))
    weight_map = {**{k: first for k in main}, **{k: second for k in mtp}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["num_nextn_predict_layers"] = 1
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_both_ways(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    kw = CONFIGS[name]
    hf = hf_model(**kw)
    hf_dir, our_dir = str(tmp_path / "hf"), str(tmp_path / "ours")
    hf.save_pretrained(hf_dir)
    with_mtp = name == "dense_first_mtp"
    if with_mtp:
        add_mtp_shard(hf_dir, kw["num_hidden_layers"])
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        want = hf(ids).logits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = from_pretrained(hf_dir).eval()
        absorbed = from_pretrained(hf_dir, attn_impl="absorb", expert_impl="loop").eval()
    # transformers' save drops MTP layers while its config still announces one: said, and built without MTP
    assert any("loading without MTP" in str(w.message) for w in caught) != with_mtp
    assert len(ours.mtp) == int(with_mtp)
    with torch.no_grad():
        assert (ours(ids) - want).abs().max().item() <= 1e-4
        assert (absorbed(ids) - want).abs().max().item() <= 1e-4

    save_pretrained(ours, our_dir)
    assert_same_state(ours, from_pretrained(our_dir))                      # load -> save -> load is exact
    back = DeepseekV3ForCausalLM.from_pretrained(our_dir).eval()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max().item() <= 1e-4

    if with_mtp:  # the MTP depth against transformers' own MTP implementation, reading the same files
        from transformers.modeling_layers import MtpModel
        L = kw["num_hidden_layers"]
        monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{L}\..*"])
        main = DeepseekV3ForCausalLM.from_pretrained(hf_dir).eval()
        mtp = MtpModel.from_pretrained(main)
        nxt = torch.cat((ids[:, 1:], torch.zeros_like(ids[:, :1])), 1)     # depth 1 reads t_{i+1}
        with torch.no_grad():
            h = main(ids, output_hidden_states=True).hidden_states[-1]     # final normalized hidden state
            pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
            ref = mtp._project_to_logits(mtp.forward_layer(0, h, pos, None, input_ids=nxt))
            h0 = ours.norm(ours.hidden_states(ids))
            got = ours.lm_head(ours.mtp[0](h0, ours.embed(nxt)))
        assert (got - ref).abs().max().item() <= 1e-4


def test_yarn_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    v3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}               # V3's config.json
    plain = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0, "original_max_position_embeddings": 64}
    for params in (v3, YARN, plain):
        cfg = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=dict(params))
        inv_hf, attn_hf = ROPE_INIT_FUNCTIONS["yarn"](cfg)
        scaling = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")} | {"type": "yarn"}
        inv, attn, softmax_mult = rope_parameters(64, params["rope_theta"], scaling, 163840)
        torch.testing.assert_close(inv.float(), inv_hf, rtol=1e-6, atol=0)
        assert attn == pytest.approx(attn_hf, rel=1e-12)
        assert softmax_mult == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, 1.0), rel=1e-12)


def test_fp8_block_checkpoints_are_dequantized(tmp_path):
    # the block rule on a matrix of 3 x 2 blocks with ragged edges
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    scale = torch.rand(3, 2) + 0.5
    q = (w / 4).to(torch.float8_e4m3fn)
    got = dequantize_fp8(q, scale)
    for i, j in ((0, 0), (299, 199), (128, 127), (127, 128), (256, 130)):
        assert got[i, j].item() == (q[i, j].float() * scale[i // 128, j // 128]).item()

    # a whole model stored with FP8 projections + weight_scale_inv, as deepseek-ai/DeepSeek-V3 on the hub
    hf = hf_model(**CONFIGS["qlora_yarn_groups"])
    src = str(tmp_path / "bf")
    hf.save_pretrained(src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    quantized, expected = {}, {}
    for k, t in tensors.items():
        if k.endswith("proj.weight") and t.dim() == 2:
            n_r, n_c = math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128)
            amax = t.abs().amax().clamp_min(1e-12)
            s = torch.full((n_r, n_c), (amax / 448.0).item())
            q = (t / s[0, 0]).to(torch.float8_e4m3fn)
            quantized[k], quantized[k + "_scale_inv"] = q, s
            expected[k] = q.float() * s[0, 0]
        else:
            quantized[k] = t
    dst = tmp_path / "fp8"
    dst.mkdir()
    save_file(quantized, str(dst / "model.safetensors"))
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="without MTP"):
        ours = from_pretrained(str(dst))
    hub = duet_to_hub_tensors(ours)
    for k, t in expected.items():
        assert torch.equal(hub[k], t), k
        assert (t - tensors[k]).abs().max() <= tensors[k].abs().max() / 16   # e4m3: 3 mantissa bits


@pytest.mark.parametrize("key,value,match", [
    ("scoring_func", "tanh", "scoring_func='tanh'"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "rope_scaling.type='dynamic'"),
    ("quantization_config", {"quant_method": "gptq"}, "quantization_config"),
    ("topk_method", "group_limited_greedy", "topk_method"),
])
def test_unsupported_config_values_name_the_key(tmp_path, key, value, match):
    hf = hf_model(**CONFIGS["plain_tied"])
    hf.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        from_pretrained(str(tmp_path))
