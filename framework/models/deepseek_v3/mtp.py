"""Multi-token prediction modules (V3 §2.2).

Depth k (1..D) predicts the token k+1 places ahead. At position i it combines the previous depth's representation
h^{k-1}_i (h^0 = the main model's final, normalized hidden state) with the embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     (V3 eq. 21; the checkpoint puts the embedding first)
    h^k  = shared_head.norm(Block(h'))                            (V3 eq. 22; causal over positions as usual)
    logits = lm_head(h^k)                                         (V3 eq. 23; embedding and head shared)

Names follow the Hugging Face / DeepSeek checkpoint layout of layer num_hidden_layers + k - 1: enorm, hnorm,
eh_proj, shared_head.norm, and the decoder block's parameters (here under `block.`, at the top level in the
checkpoint; hf.py renames). The block is always an MoE block, as in the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from framework.models.layers import RMSNorm


class SharedHead(nn.Module):
    """Holds the final norm of an MTP depth; the output projection itself is the model's lm_head."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """[B, T] -> [B, T] with out[:, i] = x[:, i + k] and the last k positions set to `fill`."""
    if k == 0:
        return x
    pad = x.new_full((x.shape[0], min(k, x.shape[1])), fill)
    return torch.cat((x[:, k:], pad), dim=1)


class MTPLayer(nn.Module):
    """One MTP depth around a decoder block built by the model (always an MoE block)."""

    def __init__(self, cfg, block: nn.Module):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm = RMSNorm(C, eps)
        self.hnorm = RMSNorm(C, eps)
        self.eh_proj = nn.Linear(2 * C, C, bias=False)
        self.block = block
        self.shared_head = SharedHead(C, eps)

    def project(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h_prev, emb [B, T, C] -> h' [B, T, C], the block's input (V3 eq. 21)."""
        return self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, start_pos: int = 0, cache=None) -> torch.Tensor:
        """h_prev, emb [B, T, C] -> h^k [B, T, C], normalized (the input of lm_head and of depth k+1)."""
        return self.shared_head.norm(self.block(self.project(h_prev, emb), start_pos, cache))


def depth_inputs(input_ids: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding input and target of depth k, both [B, T].

    With labels[i] = t_{i+1} (input shifted by one, -100 = ignored): the input at position i is t_{i+k}
    (input_ids shifted left by k) and the target is t_{i+k+1} (labels shifted left by k); the last k positions have
    no such tokens, so their inputs are 0 (any valid id: causality keeps them out of earlier positions) and their
    targets are ignored.
    """
    return shift_left(input_ids, k, 0), shift_left(labels, k, -100)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over targets != -100; 0 (still attached to the graph) when every target is ignored."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; float64 stays float64
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return losses / (targets != -100).sum().clamp_min(1)
