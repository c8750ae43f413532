"""Multi-head Latent Attention (V3 §2.1.1).

Keys and values are rebuilt from one small latent per token: c = RMSNorm(W_dkv x) of width kv_lora_rank, so a cache
holds only c [B, S, r] plus one shared rotary key k_pe [B, S, d_r] instead of full per-head K and V. Positions enter
only through a decoupled rotary part of width qk_rope_head_dim (RoPE cannot be absorbed into the up-projection).

Two equivalent paths (`model.attn_impl`):
  naive   expand c into per-head k_nope and v with kv_b_proj, then ordinary attention (what training uses by default)
  absorb  fold kv_b_proj into the query and the output instead ("weight absorption", DeepSeek's inference code):
          q_nope . (W_uk c) = (W_uk^T q_nope) . c   and   sum_s p_s (W_uv c_s) = W_uv (sum_s p_s c_s),
          so scores and the weighted sum are taken directly against the cached latent.

Parameter names follow Hugging Face's DeepseekV3Attention so checkpoints map 1:1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.models.layers import RMSNorm
from framework.weight_grad import weight_einsum

# The low-rank norms inside MLA use a fixed eps in DeepSeek's code and in Hugging Face's port (not rms_norm_eps).
LATENT_NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------------------------------
# Rotary embedding with optional YaRN scaling
# --------------------------------------------------------------------------------------------------------------------

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_parameters(dim: int, theta: float, scaling: Optional[dict], max_positions: int):
    """Inverse frequencies [dim/2] (float64), the factor applied to cos/sin, and the factor on the softmax scale.

    `scaling` is the `rope_scaling` dict of the config (None = plain RoPE). Only YaRN is supported, with the same
    conventions as Hugging Face's `_compute_yarn_parameters` + `yarn_apply_mscale` so converted checkpoints match:
    frequencies are blended between extrapolation (high frequencies) and interpolation by `factor` (low frequencies)
    over the dimension range set by beta_fast/beta_slow; cos/sin are multiplied by mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) and the softmax scale by mscale(factor, mscale_all_dim)^2 (V3: 1 and 1.87).
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / theta ** exponents
    if not scaling:
        return inv_freq, 1.0, 1.0
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind == "default":
        return inv_freq, 1.0, 1.0
    if kind != "yarn":
        raise ValueError(f"model.rope_scaling.type={kind!r}: allowed: yarn, default")
    if "original_max_position_embeddings" not in scaling:
        raise ValueError("model.rope_scaling.original_max_position_embeddings=None: yarn needs the pre-training length")
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        attn_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                       if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                      # 1 = keep the original frequency (extrapolate)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    softmax_mult = _yarn_mscale(factor, mscale_all_dim) ** 2 if mscale_all_dim else 1.0
    return inv_freq, float(attn_factor), float(softmax_mult)


class RotaryTables(nn.Module):
    """cos/sin [max_positions, d_r/2] built once and shared by every MLA layer (buffers, not saved)."""

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: Optional[dict] = None,
                 interleaved: bool = True):
        super().__init__()
        inv_freq, attn_factor, self.softmax_mult = rope_parameters(dim, theta, scaling, max_positions)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", (angles.cos() * attn_factor).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * attn_factor).float(), persistent=False)
        self.interleaved = interleaved
        self.max_positions = max_positions

    def tables(self, start: int, length: int, device: torch.device):
        if start + length > self.max_positions:
            raise ValueError(f"position {start + length - 1} >= model.max_position_embeddings={self.max_positions}")
        return self.cos[start:start + length].to(device), self.sin[start:start + length].to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., T, d] by position; cos/sin [T, d/2].

    DeepSeek's weights pair the rotary dims as (0,1), (2,3), ... (interleaved); the output is written in the split
    layout [even parts | odd parts] as Hugging Face does. Queries and keys get the same permutation, so q.k is
    unchanged, and the cached rope key simply lives in the split layout. With interleaved=False pairs are (i, i+d/2).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


# --------------------------------------------------------------------------------------------------------------------
# Cache of the compressed latent (inference)
# --------------------------------------------------------------------------------------------------------------------

class LatentCache:
    """Per-layer decoding cache: the normalized latent c [B, S, r] and the rotated shared key k_pe [B, S, d_r].

    Both attention paths read it (naive re-expands K/V from it at every step, as Hugging Face does), so the cache is
    kv_lora_rank + qk_rope_head_dim numbers per token and layer (576 for V3) instead of 2 * H * d.
    """

    def __init__(self):
        self.latent: Optional[torch.Tensor] = None
        self.rope_key: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.latent is None else self.latent.shape[1]

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.latent is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat((self.latent, latent), dim=1)
            self.rope_key = torch.cat((self.rope_key, rope_key), dim=1)
        return self.latent, self.rope_key

    def truncate(self, length: int) -> None:
        """Drop positions >= length (rejected speculative tokens)."""
        if self.latent is not None:
            self.latent, self.rope_key = self.latent[:, :length], self.rope_key[:, :length]


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len], True = may attend. Queries are the last q_len positions of the kv_len keys."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


# --------------------------------------------------------------------------------------------------------------------
# MLA
# --------------------------------------------------------------------------------------------------------------------

class MLA(nn.Module):
    def __init__(self, cfg, rotary: RotaryTables):
        super().__init__()
        C, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads = H
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        impl = getattr(cfg, "attn_impl", "naive")
        if impl not in ("naive", "absorb"):
            raise ValueError(f"model.attn_impl={impl!r}: allowed: naive, absorb")
        self.impl = impl
        bias = cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(C, H * self.qk_dim, bias=False)
        else:  # query compression: down to q_lora_rank, normalize, up to all heads
            self.q_a_proj = nn.Linear(C, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        # one projection gives the KV latent and the shared rotary key ("MQA" part: one rope key for all heads)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, C, bias=bias)
        self.rotary = [rotary]  # a list: the shared tables are registered once, on the model
        self.softmax_scale = self.qk_dim ** -0.5 * rotary.softmax_mult

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: Optional[LatentCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        rot = self.rotary[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)     # [B, T, H, dn], [B, T, H, dr]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                                 # [B, T, r]

        cos, sin = rot.tables(start_pos, T, x.device)
        q_pe = apply_rotary(q_pe.transpose(1, 2), cos, sin, rot.interleaved).transpose(1, 2)
        k_pe = apply_rotary(k_pe, cos, sin, rot.interleaved)                 # [B, T, dr]
        if cache is not None:
            if len(cache) != start_pos:
                raise ValueError(f"start_pos={start_pos}: the cache holds {len(cache)} positions")
            latent, k_pe = cache.append(latent, k_pe)                        # [B, S, r], [B, S, dr]
        S = latent.shape[1]
        mask = None if T == 1 else causal_mask(T, S, x.device)               # one new token sees everything

        if self.impl == "naive":
            y = self._naive(q_nope, q_pe, latent, k_pe, mask)
        else:
            y = self._absorbed(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(y.reshape(B, T, H * self.v_dim))

    def _naive(self, q_nope, q_pe, latent, k_pe, mask):
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T|S, d]
        if mask is not None and S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return y.transpose(1, 2)                                             # [B, T, H, dv]

    def _w_uk(self, w: torch.Tensor) -> torch.Tensor:
        return w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)[:, :self.nope_dim]   # [H, dn, r]

    def _w_uv(self, w: torch.Tensor) -> torch.Tensor:
        return w.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)[:, self.nope_dim:]   # [H, dv, r]

    def _absorbed(self, q_nope, q_pe, latent, k_pe, mask):
        # kv_b_proj's key and value halves, applied per head (weight gradients deferrable like its linear's)
        w = self.kv_b_proj.weight
        q_latent = weight_einsum("bthd,hdr->bthr", q_nope, w, self._w_uk)   # query moved into latent space
        scores = (torch.einsum("bthr,bsr->bhts", q_latent, latent)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).type_as(scores)
        o_latent = torch.einsum("bhts,bsr->bthr", probs, latent)            # weighted latent per head
        return weight_einsum("bthr,hdr->bthd", o_latent, w, self._w_uv)     # [B, T, H, dv]
