"""Dense Llama-style baseline: RMSNorm, RoPE, SwiGLU, multi-head attention.

Every model family in duet has the same outline, which the trainer and the pipeline splitter rely on:
  embed (nn.Embedding) -> layers (nn.ModuleList of blocks, block(h) -> h) -> norm -> lm_head
  forward(input_ids [B, T]) -> logits [B, T, V]
  compute_loss(input_ids, labels) -> (loss, metrics)    labels [B, T], -100 = ignored
  embed_tokens(input_ids) -> h;  final(h, input_ids, labels) -> (loss, metrics): the part after the last layer
  flops_per_token(seq_len) -> float: training FLOPs (forward + backward) per token, for MFU
"""
from __future__ import annotations

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, H, T, D]
        T = x.shape[-2]
        return apply_rope(x, self.cos[:T], self.sin[:T])


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))               # [B, H, T, D]
        rot = self.rotary[0]
        q, k = rot(q), rot(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)             # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
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

    def final(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        loss = causal_lm_loss(self.lm_head(self.norm(h)), labels)
        return loss, {"loss/main": loss.detach()}

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.final(h, input_ids, labels)

    def flops_per_token(self, seq_len: int) -> float:
        """6 * (matmul parameters) + attention scores: 6N + 12 L C T (PaLM appendix B / nanoGPT's estimate_mfu)."""
        c = self.config
        n = sum(p.numel() for n_, p in self.named_parameters() if "embed" not in n_)
        return 6.0 * n + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len
