"""Autoregressive generation with an MLA latent cache and optional MTP self-drafting (V3 §2.2, §5.4.3).

Cache: each layer keeps the normalized KV latent and the rotated shared rope key (mla.LatentCache), as DeepSeek's
inference code does on its absorbed path; the naive path re-expands K/V from it at every step. The MTP depth keeps
its own cache the same way.

Self-drafting (use_mtp_draft=True, batch 1): after the main model emits token t_{n+1} at position n, the first MTP
depth reads the main model's hidden state at n and the embedding of t_{n+1} and proposes t_{n+2}. The next main
forward processes [t_{n+1}, draft] together: its output at n+1 gives the true t_{n+2}; if it equals the draft, the
output at n+2 already gives t_{n+3} (two tokens for one forward), otherwise the draft's cache entry is dropped.
Acceptance compares the main model's own choice (argmax, or its sample) with the draft, so the tokens are exactly
those the main model alone would produce (with temperature > 0: the same distribution).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from framework.models.deepseek_v3.mla import LatentCache


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] -> next token [B, 1]: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p               # keep the smallest set with mass >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)


class _Runner:
    """Main-model and MTP forwards over new positions, with caches or by recomputing the whole prefix."""

    def __init__(self, model, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        n_layers = len(model.layers)
        self.caches = [LatentCache() for _ in range(n_layers)] if use_cache else None
        self.mtp_cache = LatentCache() if use_cache else None
        self.seq: Optional[torch.Tensor] = None        # tokens the main model has processed
        self.h_all: Optional[torch.Tensor] = None      # their normalized hidden states (no-cache mode)
        self.mtp_len = 0                               # positions the MTP depth has processed

    def main(self, new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Process new_tokens [B, n] after self.seq; returns normalized hidden [B, n, C] and logits [B, n, V]."""
        m, n = self.model, new_tokens.shape[1]
        start = 0 if self.seq is None else self.seq.shape[1]
        self.seq = new_tokens if self.seq is None else torch.cat((self.seq, new_tokens), dim=1)
        if self.use_cache:
            h = m.norm(m.hidden_states(new_tokens, start, self.caches))
        else:
            self.h_all = m.norm(m.hidden_states(self.seq))
            h = self.h_all[:, -n:]
        return h, m.lm_head(h)

    def truncate(self, length: int) -> None:
        self.seq = self.seq[:, :length]
        if self.use_cache:
            for c in self.caches:
                c.truncate(length)
        else:
            self.h_all = self.h_all[:, :length]

    def draft(self, h_new: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """MTP depth 1 on new positions (hidden h_new [B, n, C], the tokens that follow them [B, n]).

        Returns its logits at the last position [B, V]: the proposal for the token after next_tokens[:, -1].
        """
        m = self.model
        depth = m.mtp[0]
        if self.use_cache:
            h = depth(h_new, m.embed_tokens(next_tokens), self.mtp_len, self.mtp_cache)
            self.mtp_len += next_tokens.shape[1]
        else:  # recompute over every processed position; the token after the last one is next_tokens[:, -1]
            known = torch.cat((self.seq, next_tokens[:, -1:]), dim=1)
            h = depth(self.h_all, m.embed_tokens(known[:, 1:]))
        return m.lm_head(h[:, -1])


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             use_mtp_draft: bool = False, use_cache: bool = True, generator: Optional[torch.Generator] = None):
    """Continue input_ids [B, T] by max_new_tokens tokens. Returns (tokens [B, T + max_new_tokens], stats).

    stats: new_tokens, seconds, tokens_per_s, main_forwards, and with use_mtp_draft the drafts proposed/accepted and
    acceptance_rate. Router load counters are left as they were.
    """
    B, T = input_ids.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if use_mtp_draft and len(model.mtp) == 0:
        raise ValueError("use_mtp_draft=True: the model has no MTP depth (model.num_nextn_predict_layers=0)")
    if use_mtp_draft and B != 1:
        raise ValueError(f"use_mtp_draft=True: batch size {B}, drafting supports batch size 1")
    limit = model.config.max_position_embeddings
    if T + max_new_tokens + int(use_mtp_draft) > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens}: prompt {T} + new tokens exceed "
                         f"model.max_position_embeddings={limit}")
    stats = {"main_forwards": 0, "draft_proposed": 0, "draft_accepted": 0}
    t0 = time.perf_counter()

    run = _Runner(model, use_cache)
    seq = input_ids
    if max_new_tokens > 0:
        h, logits = run.main(input_ids)                                      # prefill
        stats["main_forwards"] += 1
        seq = torch.cat((seq, _pick(logits[:, -1], temperature, top_p, generator)), dim=1)
        if use_mtp_draft:
            draft_logits = run.draft(h, seq[:, 1:])
        while seq.shape[1] < T + max_new_tokens:
            if not use_mtp_draft:
                h, logits = run.main(seq[:, -1:])
                stats["main_forwards"] += 1
                seq = torch.cat((seq, _pick(logits[:, -1], temperature, top_p, generator)), dim=1)
                continue
            draft = _pick(draft_logits, temperature, top_p, generator)     # proposal for the token after next
            h, logits = run.main(torch.cat((seq[:, -1:], draft), dim=1))   # verify: positions n, n+1
            stats["main_forwards"] += 1
            stats["draft_proposed"] += 1
            true_next = _pick(logits[:, 0], temperature, top_p, generator)
            if torch.equal(true_next, draft):
                stats["draft_accepted"] += 1
                after = _pick(logits[:, 1], temperature, top_p, generator)
                seq = torch.cat((seq, draft, after), dim=1)
                draft_logits = run.draft(h, seq[:, -2:])
            else:
                run.truncate(seq.shape[1])                                   # forget the rejected draft
                seq = torch.cat((seq, true_next), dim=1)
                draft_logits = run.draft(h[:, :1], seq[:, -1:])

    seconds = time.perf_counter() - t0
    seq = seq[:, :T + max_new_tokens]
    stats.update(new_tokens=max_new_tokens, seconds=seconds, tokens_per_s=B * max_new_tokens / max(seconds, 1e-9))
    if use_mtp_draft:
        stats["acceptance_rate"] = stats["draft_accepted"] / max(stats["draft_proposed"], 1)
    return seq, stats
