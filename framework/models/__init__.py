"""Model registry: `model.name` -> constructor. Every family follows the outline documented in dense.py."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from framework.config import ModelConfig


def _dense(cfg: ModelConfig) -> nn.Module:
    from framework.models.dense import DenseLM
    return DenseLM(cfg)


def _deepseek_v3(cfg: ModelConfig) -> nn.Module:
    from framework.models.deepseek_v3 import DeepSeekV3
    return DeepSeekV3(cfg)


REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {"dense": _dense, "deepseek_v3": _deepseek_v3}


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.name not in REGISTRY:
        raise ValueError(f"model.name={cfg.name!r}: allowed: {', '.join(REGISTRY)}")
    return REGISTRY[cfg.name](cfg)


def from_pretrained(path: str, **overrides) -> nn.Module:
    """Load a Hugging Face DeepSeek-V3 folder (config.json + safetensors, hub layout)."""
    from framework.models.hf import from_pretrained as _load
    return _load(path, **overrides)


def save_pretrained(model: nn.Module, path: str) -> None:
    """Write the Hugging Face DeepSeek-V3 layout (config.json + model.safetensors)."""
    from framework.models.hf import save_pretrained as _save
    _save(model, path)
