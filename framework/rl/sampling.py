"""Batched generation with a KV cache: G samples per prompt, temperature / top-p, stop tokens and stop strings.

Works for the dense baseline (DenseLM.decode with per-layer KVCache) and DeepSeek-V3 (hidden_states with the MLA
LatentCache of its generate.py; router load counters are restored afterwards so sampling never feeds the balancing
statistics). `use_cache=False` recomputes the whole prefix at every step: the reference the cache is tested against.

Prompts of different lengths are decoded in separate batches of equal length (no padding inside a prompt, so no
attention mask is needed and every row's positions start at 0, exactly as in training). Rows that finished are
dropped from the batch and from the caches, so a long straggler does not keep finished rows busy.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


@dataclass
class Samples:
    prompt_index: list[int]               # row -> index of its prompt in the input list
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]       # up to and including the stop token / the token that completed a stop string
    finished: list[bool]                  # False: cut by max_new_tokens
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


def pick_next(logits: torch.Tensor, temperature: float, top_p: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax at temperature 0, else sampling from the smallest set of tokens whose
    probability mass reaches top_p (nucleus sampling)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        drop = p_sorted.cumsum(dim=-1) - p_sorted >= top_p                  # mass before this token already enough
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Decoder:
    """Model-family adapter: logits of new positions given the cached prefix; rows can be dropped."""

    def __init__(self, model, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.kind = "dense" if hasattr(model, "decode") else "deepseek_v3" if hasattr(model, "hidden_states") else None
        if self.kind is None:
            raise ValueError(f"sampling: {type(model).__name__} offers neither decode() (dense) nor hidden_states() "
                             "(deepseek_v3)")
        self.caches = None
        self.prefix: Optional[torch.Tensor] = None     # all tokens so far (no-cache mode)

    def start(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            if self.kind == "dense":
                self.caches = self.model.new_caches()
            else:
                from framework.models.deepseek_v3.mla import LatentCache
                self.caches = [LatentCache() for _ in self.model.layers]
        self.prefix = None
        return self.step(input_ids, 0)

    def step(self, new_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """new_ids [B, n] at positions start_pos.. -> logits of the last position [B, V]."""
        m = self.model
        if not self.use_cache:
            self.prefix = new_ids if self.prefix is None else torch.cat((self.prefix, new_ids), dim=1)
            if self.kind == "dense":
                return m(self.prefix)[:, -1]
            return m.lm_head(m.norm(m.hidden_states(self.prefix)[:, -1]))
        if self.kind == "dense":
            return m.decode(new_ids, start_pos, self.caches)[:, -1]
        return m.lm_head(m.norm(m.hidden_states(new_ids, start_pos, self.caches)[:, -1]))

    def keep(self, rows: torch.Tensor) -> None:
        if not self.use_cache:
            self.prefix = self.prefix[rows]
        elif self.kind == "dense":
            for c in self.caches:
                c.select(rows)
        else:
            for c in self.caches:
                if c.latent is not None:
                    c.latent, c.rope_key = c.latent[rows], c.rope_key[rows]


def _stop_checker(stop_strings: Sequence[str], decode: Optional[Callable[[list[int]], str]]):
    """-> fn(completion_ids) -> bool: True once the decoded tail contains a stop string. Each token decodes to at
    least one character, so the last max(len(stop)) tokens hold any stop string that the last token completed."""
    if not stop_strings:
        return None
    if decode is None:
        raise ValueError("stop strings need a decode function (token ids -> text)")
    span = max(len(s) for s in stop_strings)

    def hit(ids: list[int]) -> bool:
        tail = decode(ids[-span:])
        return any(s in tail for s in stop_strings)
    return hit


@torch.no_grad()
def sample(model, prompts: Sequence[Sequence[int]], num_samples: int = 1, max_new_tokens: int = 32,
           temperature: float = 1.0, top_p: float = 1.0, eos_id: Optional[int] = None,
           stop_strings: Sequence[str] = (), decode: Optional[Callable[[list[int]], str]] = None,
           generator: Optional[torch.Generator] = None, max_batch: int = 512, use_cache: bool = True,
           device: Optional[torch.device] = None) -> Samples:
    """num_samples completions of every prompt (rows of one prompt are adjacent: row = prompt * G + g).

    A row stops at eos_id (kept as its last token), when its text contains a stop string, or after max_new_tokens.
    stats: new_tokens (generated, counted up to each row's stop), seconds, tokens_per_s, forwards.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    limit = model.config.max_position_embeddings
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens}: prompt {longest} + new tokens exceed "
                         f"model.max_position_embeddings={limit}")
    device = device or next(model.parameters()).device
    stop_hit = _stop_checker(stop_strings, decode)
    was_training = model.training
    model.eval()

    rows = [(i, g) for i in range(len(prompts)) for g in range(num_samples)]
    completions: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    by_len: dict[int, list[int]] = defaultdict(list)     # prompt length -> row numbers
    for r, (i, _) in enumerate(rows):
        by_len[len(prompts[rows[r][0]])].append(r)
    t0, forwards = time.perf_counter(), 0
    for T, members in sorted(by_len.items()):
        for b0 in range(0, len(members), max_batch):
            batch = members[b0:b0 + max_batch]                               # row numbers in this decode batch
            ids = torch.tensor([list(prompts[rows[r][0]]) for r in batch], dtype=torch.long, device=device)
            dec = _Decoder(model, use_cache)
            logits = dec.start(ids)                                           # prefill [B, V]
            forwards += 1
            active = list(batch)
            pos = T
            for step in range(max_new_tokens):
                nxt = pick_next(logits, temperature, top_p, generator).tolist()
                keep = []
                for j, r in enumerate(active):
                    completions[r].append(nxt[j])
                    done = ((eos_id is not None and nxt[j] == eos_id)
                            or (stop_hit is not None and stop_hit(completions[r])))
                    finished[r] = done
                    if not done:
                        keep.append(j)
                if not keep or step == max_new_tokens - 1:
                    break
                new = torch.tensor([[nxt[j]] for j in keep], dtype=torch.long, device=device)
                if len(keep) < len(active):
                    dec.keep(torch.tensor(keep, device=device))
                    active = [active[j] for j in keep]
                logits = dec.step(new, pos)
                forwards += 1
                pos += 1
    seconds = time.perf_counter() - t0

    model.train(was_training)
    new_tokens = sum(len(c) for c in completions)
    stats = {"new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9),
             "forwards": forwards}
    return Samples([i for i, _ in rows], [list(prompts[i]) for i, _ in rows], completions, finished, stats)
