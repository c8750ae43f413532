"""Hugging Face DeepSeek-V3 checkpoints <-> duet's DeepSeekV3.

Layout (hub names, the same as deepseek-ai/DeepSeek-V3 and transformers' DeepseekV3ForCausalLM):
  model.embed_tokens.weight, model.norm.weight, lm_head.weight
  model.layers.N.{input_layernorm, post_attention_layernorm}.weight
  model.layers.N.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm,
                            kv_b_proj, o_proj}.weight
  model.layers.N.mlp.{gate_proj, up_proj, down_proj}.weight                        (dense layers)
  model.layers.N.mlp.gate.weight, model.layers.N.mlp.gate.e_score_correction_bias  (MoE layers)
  model.layers.N.mlp.experts.E.{gate_proj, up_proj, down_proj}.weight, model.layers.N.mlp.shared_experts.*
  model.layers.{L+k}.*: MTP depth k+1 = {enorm, hnorm, eh_proj, shared_head.norm} + a decoder block at the top
      level (+ copies of the embedding and head, embed_tokens / shared_head.head, which are shared here)

duet stacks each layer's experts (experts.gate_up_proj [E, 2I, C], experts.down_proj [E, C, I]) and nests an MTP
depth's block under `block.`; this module does the renaming. FP8 checkpoints (float8_e4m3fn weights with
`weight_scale_inv` [ceil(N/128), ceil(K/128)], one scale per 128x128 block) are dequantized on load.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Any, Optional

import torch

from framework.config import ModelConfig

# config.json keys copied as they are into ModelConfig
_ARCH_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "initializer_range",
    "attention_bias", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace",
    "moe_layer_freq", "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor", "n_group",
    "topk_group", "num_nextn_predict_layers",
)
# keys without effect on the computation (bookkeeping, generation defaults, training-only settings of other codes)
_IGNORED_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "output_router_logits", "num_key_value_heads", "head_dim",
    "qk_head_dim", "ep_size", "pretraining_tp", "aux_loss_alpha", "seq_aux", "_name_or_path", "id2label",
    "label2id", "return_dict", "output_hidden_states", "output_attentions", "tie_encoder_decoder", "is_encoder_decoder",
    "chunk_size_feed_forward", "problem_type", "tokenizer_class", "num_mtp_layers", "rope_parameters",
    "rope_scaling", "rope_interleave", "hidden_act", "attention_dropout", "quantization_config",
    "_experts_implementation", "_attn_implementation",
}
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate")


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config.json {key}={value!r}: {allowed}")


def check_hf_config(hf: dict) -> None:
    """Fail, naming the key, on config.json values this implementation cannot honor."""
    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
        _fail("model_type", hf["model_type"], "allowed: deepseek_v3")
    if hf.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", hf["hidden_act"], "allowed: silu")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        _fail("attention_dropout", hf["attention_dropout"], "allowed: 0.0")
    if hf.get("scoring_func", "sigmoid") not in ("sigmoid", "softmax"):
        _fail("scoring_func", hf["scoring_func"], "allowed: sigmoid, softmax")
    if hf.get("topk_method", "noaux_tc") not in ("noaux_tc", "greedy"):
        _fail("topk_method", hf["topk_method"], "allowed: noaux_tc, greedy")
    quant = hf.get("quantization_config")
    if quant is not None:
        if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
            _fail("quantization_config", quant, "allowed: quant_method fp8 with fmt e4m3 (dequantized on load)")
    source = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = source.get("type", source.get("rope_type", "default"))
    if kind not in ("default", "yarn"):
        _fail("rope_scaling.type", kind, "allowed: yarn, default")
    unknown = sorted(set(source) - set(_ROPE_KEYS) - {"type", "rope_type", "rope_theta"}) if kind == "yarn" else []
    if unknown:
        _fail(f"rope_scaling.{unknown[0]}", source[unknown[0]], f"allowed yarn keys: {', '.join(_ROPE_KEYS)}")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a config.json dict; `overrides` are ModelConfig fields that win over the file."""
    check_hf_config(hf)
    fields = {k: hf[k] for k in _ARCH_KEYS if k in hf}
    if "num_nextn_predict_layers" not in fields and "num_mtp_layers" in hf:
        fields["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    fields.setdefault("num_nextn_predict_layers", 0)
    # RoPE: legacy rope_theta + rope_scaling (DeepSeek's file), or transformers' rope_parameters {rope_theta, rope_type}
    legacy, rope = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
    source = legacy or rope
    kind = source.get("type", source.get("rope_type", "default"))
    scaling = {k: v for k, v in source.items() if k not in ("rope_theta", "rope_type", "type")}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    if kind == "yarn":
        fields["rope_scaling"] = {"type": "yarn", **scaling}
    if fields.get("rope_theta") is not None:
        fields["rope_theta"] = float(fields["rope_theta"])
    unknown = sorted(set(hf) - set(_ARCH_KEYS) - _IGNORED_KEYS)
    if unknown:
        warnings.warn(f"config.json keys ignored (no effect on this implementation): {', '.join(unknown)}")
    interleave = hf.get("rope_interleave", True)
    for k in overrides:
        if k not in ModelConfig.__dataclass_fields__ and k != "rope_interleave":
            raise ValueError(f"override {k}={overrides[k]!r}: not a model config field")
    fields.update(overrides)
    interleave = fields.pop("rope_interleave", interleave)
    cfg = ModelConfig(name="deepseek_v3", **fields)
    if not interleave:
        cfg.rope_interleave = False  # read with getattr by the model; ModelConfig has no field for it
    return cfg


def config_to_hf(cfg, dtype: torch.dtype) -> dict:
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    for k in _ARCH_KEYS:
        out[k] = getattr(cfg, k)
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    rope_parameters = {"rope_theta": float(cfg.rope_theta), "rope_type": "yarn" if scaling else "default"}
    if scaling:
        rope_parameters.update({k: v for k, v in scaling.items() if k not in ("type", "rope_type")})
    out.update(
        hidden_act="silu", attention_dropout=0.0, num_key_value_heads=cfg.num_attention_heads,
        rope_interleave=getattr(cfg, "rope_interleave", True), rope_parameters=rope_parameters,
        dtype=str(dtype).removeprefix("torch."),
    )
    return out


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------

def _checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not found:
        raise ValueError(f"path={path!r}: no model.safetensors, model.safetensors.index.json or *.safetensors")
    return found


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """float8 [N, K] * per-block scale [ceil(N/b0), ceil(K/b1)] -> float32 [N, K]."""
    N, K = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], dim=0)[:N].repeat_interleave(block[1], dim=1)[:, :K]
    return weight.float() * s


def _read_hub_tensors(path: str, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    raw: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in f.keys():
                raw[k] = f.get_tensor(k)
    out = {}
    for k, t in raw.items():
        if k.endswith(".weight_scale_inv"):
            continue
        scale = raw.get(k[: -len("weight")] + "weight_scale_inv") if k.endswith(".weight") else None
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale is None:
                raise ValueError(f"checkpoint tensor {k} is {t.dtype} without {k}_scale_inv")
            t = dequantize_fp8(t, scale, block)
        out[k] = t
    return out


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_SHARED_COPIES = ("embed_tokens.", "shared_head.head.")


def _hub_to_duet_name(key: str, n_layers: int) -> Optional[str]:
    """duet's state-dict name for a hub key (expert keys keep their per-expert form); None = not stored here."""
    if key == "model.embed_tokens.weight":
        return "embed.weight"
    if key == "model.norm.weight":
        return "norm.weight"
    if key == "lm_head.weight":
        return key
    m = _LAYER.match(key)
    if m is None:
        return "?" + key
    i, rest = int(m.group(1)), m.group(2)
    if i < n_layers:
        return f"layers.{i}.{rest}"
    k = i - n_layers
    if rest.startswith(_MTP_SHARED_COPIES):
        return None
    if rest.startswith(_MTP_OWN):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def read_hf_config(path: str) -> dict:
    """config.json of a Hugging Face folder, checked for values this implementation cannot honor."""
    if not os.path.isdir(path):
        raise ValueError(f"path={path!r}: not a folder")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"path={path!r}: no config.json")
    with open(file) as f:
        hf = json.load(f)
    check_hf_config(hf)
    return hf


def hub_tensor_names(path: str) -> list[str]:
    """Names of the tensors in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open
    names = []
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            names += list(f.keys())
    return names


def resolve_config(hf: dict, tensor_names, **overrides) -> ModelConfig:
    """ModelConfig of a folder: config.json + overrides. MTP depths announced by config.json but absent from the
    tensors (transformers' own save drops them) are dropped, with a warning, unless the overrides say otherwise."""
    L = int(overrides.get("num_hidden_layers", hf.get("num_hidden_layers")))
    mtp_in_checkpoint = {int(m.group(1)) - L for k in tensor_names if (m := _LAYER.match(k)) and int(m.group(1)) >= L}
    if "num_nextn_predict_layers" not in overrides:
        announced = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0
        if announced and not mtp_in_checkpoint:
            warnings.warn(f"config.json num_nextn_predict_layers={announced} but the checkpoint has no layer "
                          f"{L}: loading without MTP")
            overrides["num_nextn_predict_layers"] = 0
    return config_from_hf(hf, **overrides)


def hub_to_duet_state(tensors: dict[str, torch.Tensor], cfg) -> tuple[dict[str, torch.Tensor], list[str]]:
    """duet's full state dict (experts stacked) from hub-named tensors -> (state, hub keys it has no place for)."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    unexpected = []
    for key, t in tensors.items():
        name = _hub_to_duet_name(key, L)
        if name is None:
            continue
        if name.startswith("?") or (name.startswith("mtp.") and int(name.split(".")[1]) >= D):
            if not name.startswith("mtp."):
                unexpected.append(key)
            continue  # MTP depths beyond the requested D are skipped on purpose
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            state[name] = t
    E = cfg.n_routed_experts
    for prefix, per_expert in experts.items():
        if sorted(per_expert) != list(range(E)) or any(len(v) != 3 for v in per_expert.values()):
            raise ValueError(f"checkpoint {prefix}: expected gate/up/down weights for experts 0..{E - 1}")
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat((per_expert[e]["gate_proj"], per_expert[e]["up_proj"]), dim=0) for e in range(E)])
        state[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(E)])
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    return state, unexpected


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], unexpected: list[str],
                where: str) -> None:
    """Every expected tensor present with its shape, nothing left over; the error names the first culprits."""
    missing = sorted(set(expected) - set(state))
    unexpected = unexpected + sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where} does not match config.json: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{where}: tensor for {k} has shape {tuple(t.shape)}, the model's is "
                             f"{tuple(expected[k].shape)}")


def read_hub_state(path: str, cfg, hf: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The folder's weights (FP8 ones dequantized) as duet's full state dict for `cfg`."""
    block = tuple((hf.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    return hub_to_duet_state(_read_hub_tensors(path, block), cfg)


def from_pretrained(path: str, dtype: Optional[torch.dtype] = None, **overrides):
    """Load a Hugging Face DeepSeek-V3 folder. `overrides` are ModelConfig fields (e.g. attn_impl="absorb").

    MTP depths are loaded when the checkpoint holds them; when config.json announces some but no tensor of layer
    num_hidden_layers is present (transformers' own save drops them), the model is built without MTP.
    `dtype`: the parameters' dtype (default: float32; the router stays float32 in any case).
    """
    from framework.models.deepseek_v3 import DeepSeekV3
    hf = read_hf_config(path)  # checked before reading any tensor
    cfg = resolve_config(hf, hub_tensor_names(path), **overrides)
    model = DeepSeekV3(cfg)
    state, unexpected = read_hub_state(path, cfg, hf)
    check_state(state, model.state_dict(), unexpected, f"checkpoint {path!r}")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(dtype)
    return model


def duet_to_hub_tensors(model) -> dict[str, torch.Tensor]:
    """The model's state as hub-named tensors (experts split per expert; each tensor its own storage)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # stored once, as the embedding
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = t.clone()
            continue
        if name in ("norm.weight", "lm_head.weight"):
            out[name if name == "lm_head.weight" else "model.norm.weight"] = t.clone()
            continue
        parts = name.split(".")
        if parts[0] == "layers":
            prefix, rest = f"model.layers.{parts[1]}", ".".join(parts[2:])
        else:  # mtp.k.(block.)rest
            prefix = f"model.layers.{L + int(parts[1])}"
            rest = ".".join(parts[3:] if parts[2] == "block" else parts[2:])
        if rest.endswith("experts.gate_up_proj"):
            base = f"{prefix}.{rest[: -len('gate_up_proj')]}"
            I = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :I].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, I:].clone()
        elif rest.endswith("experts.down_proj"):
            base = f"{prefix}.{rest[: -len('down_proj')]}"
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[f"{prefix}.{rest}"] = t.clone()
    return out


def save_pretrained(model, path: str) -> None:
    """Write config.json + model.safetensors in the hub layout (unquantized, in the model's dtype)."""
    from safetensors.torch import save_file

    from framework.models.deepseek_v3.moe import Experts
    for name, m in model.named_modules():
        if isinstance(m, Experts) and len(m.expert_ids) != model.config.n_routed_experts:
            raise ValueError(f"{name}: holds experts {m.expert_ids!r} only; save_pretrained needs every expert")
    os.makedirs(path, exist_ok=True)
    tensors = duet_to_hub_tensors(model)
    dtype = model.embed.weight.dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(model.config, dtype), f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):  # a stale index would point loaders at other files
        os.remove(index)
