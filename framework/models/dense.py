"""Dense Llama-style baseline: RMSNorm, RoPE, SwiGLU, multi-head attention.

Every model family in duet has the same outline, which the trainer and the pipeline splitter rely on:
  embed (nn.Embedding) -> layers (nn.ModuleList of blocks, block(h) -> h) -> norm -> lm_head
  forward(input_ids [B, T]) -> logits [B, T, V]
  compute_loss(input_ids, labels) -> (loss, metrics)    labels [B, T], -100 = ignored
  embed_tokens(input_ids) -> h;  final(h, input_ids, labels) -> (loss, metrics): the part after the last layer
  flops_per_token(seq_len) -> float: training FLOPs (forward + backward) per token, for MFU
Generation: decode(input_ids, start_pos, caches) -> logits runs new positions against a per-layer KVCache.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.config import ModelConfig
from framework.models.layers import RMSNorm, SwiGLU, apply_rope, causal_lm_loss, rope_tables


class Rotary(nn.Module):
    """Holds the cos/sin tables once; every block refers to the same instance (not a parameter, not saved)."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        cos, sin = rope_tables(head_dim, max_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:  # x [B, H, T, D]
        T = x.shape[-2]
        return apply_rope(x, self.cos[start_pos:start_pos + T], self.sin[start_pos:start_pos + T])


class KVCache:
    """One layer's keys and values of every position processed so far, k and v [B, H, S, D] (rotated keys).

    Generation appends the new positions' k/v and attends over all of them, so each step costs one position's
    projections instead of recomputing the prefix. `select(rows)` keeps some batch rows (finished rows dropped).
    """

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.rotary = [rotary]  # a list so the shared tables are not registered once per layer

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))               # [B, H, T, D]
        rot = self.rotary[0]
        q, k = rot(q, start_pos), rot(k, start_pos)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)         # [B, H, T, D]
        else:
            if len(cache) != start_pos:
                raise ValueError(f"start_pos={start_pos}: the cache holds {len(cache)} positions")
            k, v = cache.append(k, v)                                         # [B, H, S, D], S = start_pos + T
            S = k.shape[2]
            # query i sits at position S - T + i and sees keys 0..S-T+i; one new token sees everything
            mask = None if T == 1 else (torch.arange(S, device=x.device)[None, :]
                                        <= torch.arange(T, device=x.device)[:, None] + (S - T))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), start_pos, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DenseLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rotary = Rotary(cfg.hidden_size // cfg.num_attention_heads, cfg.max_position_embeddings, cfg.rope_theta)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, self.rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)                                          # [B, T, C]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))                                     # [B, T, V]

    def new_caches(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def decode(self, input_ids: torch.Tensor, start_pos: int, caches: Sequence[KVCache]) -> torch.Tensor:
        """Logits [B, T, V] of input_ids [B, T] sitting at positions start_pos.., appending their k/v to `caches`
        (one per layer, each holding exactly start_pos positions). Equal to forward() on the whole prefix."""
        limit = self.config.max_position_embeddings
        if start_pos + input_ids.shape[1] > limit:
            raise ValueError(f"decode: position {start_pos + input_ids.shape[1]} exceeds "
                             f"model.max_position_embeddings={limit}")
        h = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, start_pos, cache)
        return self.lm_head(self.norm(h))

    def final(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        loss = causal_lm_loss(self.lm_head(self.norm(h)), labels)
        return loss, {"loss/main": loss.detach()}

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.final(h, input_ids, labels)

    # training capabilities (framework/models/capabilities.py): no MoE layers, nothing that follows progress
    def set_progress(self, fraction: float) -> None:
        pass

    def moe_layers(self) -> int:
        return 0

    def expert_loads(self) -> torch.Tensor:
        return torch.zeros(0, 0, dtype=torch.int64)

    def update_balance(self, loads: torch.Tensor, step: int, steps: int) -> None:
        pass

    def head_modules(self) -> dict[str, nn.Module]:
        return {}

    def head_reads_embedding(self) -> bool:
        return False

    @contextlib.contextmanager
    def tally_loads(self):
        yield [torch.zeros(0, 0, dtype=torch.int64)]

    def flops_per_token(self, seq_len: int) -> float:
        """6 * (matmul parameters) + attention scores: 6N + 12 L C T (PaLM appendix B / nanoGPT's estimate_mfu)."""
        c = self.config
        n = sum(p.numel() for n_, p in self.named_parameters() if "embed" not in n_)
        return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
