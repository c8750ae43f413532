"""Start a run from a Hugging Face DeepSeek-V3 folder (`model.init_from=<folder>`).

Two moments:
  apply_init_from(cfg, overrides)  while composing: the folder's config.json sets the architecture fields of
                                   cfg.model; a `model.<key>=...` given on the command line still wins (and the result
                                   is validated like any other config)
  load_init_from(model, folder)    right after the model is built on every rank, before any parallel surgery: the
                                   folder's weights are copied in by name into the full model, so expert sharding,
                                   FP8 swaps, pipeline parts and DualPipe's second copies all start from them
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from framework.models import hf as hub

KEY = "model.init_from"


def _folder(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"{KEY}={path!r}: no such folder (expected a Hugging Face folder with config.json and "
                         f"*.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{KEY}={path!r}: the folder has no config.json")
    return path


def model_fields(path: str) -> dict[str, Any]:
    """The ModelConfig fields that config.json determines (architecture; name=deepseek_v3)."""
    try:
        hf_cfg = hub.read_hf_config(_folder(path))
        cfg = hub.resolve_config(hf_cfg, hub.hub_tensor_names(path))
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(KEY) else f"{KEY}={path!r}: {msg}") from None
    if not getattr(cfg, "rope_interleave", True):
        raise ValueError(f"{KEY}={path!r}: config.json rope_interleave=false; training supports interleaved rotary "
                         f"pairs only (from_pretrained loads it for inference)")
    fields = {k: getattr(cfg, k) for k in hub._ARCH_KEYS}
    fields["rope_scaling"] = cfg.rope_scaling
    fields["name"] = "deepseek_v3"
    return fields


def explicit_model_keys(overrides: Iterable[str]) -> set[str]:
    """model.<key> names set on the command line (`model.x=1`, `+model.x=1`, `++model.x=1`)."""
    keys = set()
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith("model."):
            keys.add(key[len("model."):])
    return keys


def apply_init_from(cfg, overrides: Iterable[str] = ()) -> None:
    """Fill cfg.model from model.init_from's config.json, in place; keys in `overrides` keep their given value."""
    path = cfg.model.get("init_from") if hasattr(cfg.model, "get") else cfg.model.init_from
    if not path:
        return
    explicit = explicit_model_keys(overrides)
    for k, v in model_fields(str(path)).items():
        if k not in explicit:
            cfg.model[k] = v


def load_init_from(model: torch.nn.Module, path: str) -> None:
    """Copy the folder's weights into `model` (the full model, before any parallel surgery), by name."""
    hf_cfg = hub.read_hf_config(_folder(path))
    state, unexpected = hub.read_hub_state(path, model.config, hf_cfg)
    expected = model.state_dict()
    try:
        hub.check_state(state, expected, unexpected, f"{KEY}={path!r}")
    except ValueError as e:
        raise ValueError(f"{e} (a model.* override that changes a shape does not fit these weights)") from None
    with torch.no_grad():
        for k, t in state.items():
            expected[k].copy_(t)
