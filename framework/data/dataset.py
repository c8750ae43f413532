"""Memmapped token windows and the deterministic, resumable sampler.

The token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and next-token labels). The sampler
walks an endless stream of window ids: epoch e is a permutation of all windows drawn from a generator seeded with
(seed, e), so the i-th sample of the run is a pure function of (seed, i). Step s of the run consumes the samples
[s * G, (s + 1) * G) of that stream (G = global batch size); data-parallel rank d takes its contiguous share of them
and cuts it into micro-batches. Its only state is the number of samples consumed, which goes into checkpoints: a
resumed run sees exactly the samples the uninterrupted run would have seen, and no sample is skipped or repeated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class TokenWindows:
    def __init__(self, bin_path: str | Path, dtype: str, seq_len: int, vocab_size: int | None = None):
        self.path = Path(bin_path)
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.seq_len = seq_len
        self.vocab_size = vocab_size           # ids at or above it are refused when read (not an embedding crash)
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            more = " or a larger data.val_fraction" if self.path.name == "val.bin" else ""
            raise ValueError(f"train.seq_len={seq_len}: longer than the data in {self.path} "
                             f"({len(self.tokens)} tokens); use a shorter seq_len or more data{more}")

    def __len__(self) -> int:
        return self.num_windows

    def get(self, window_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, labels: [len(window_ids), seq_len] int64."""
        T = self.seq_len
        rows = np.stack([self.tokens[i * T: i * T + T + 1] for i in window_ids.tolist()]).astype(np.int64)
        if self.vocab_size is not None and rows.size and rows.max() >= self.vocab_size:
            row, col = np.unravel_index(int(rows.argmax()), rows.shape)
            raise ValueError(f"{self.path}: token id {int(rows.max())} >= vocab_size={self.vocab_size} (meta.json) at "
                             f"position {int(window_ids[row]) * T + int(col)}")
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


@dataclass
class SamplerState:
    samples_consumed: int = 0


class Sampler:
    def __init__(self, windows: TokenWindows, seed: int, global_batch: int, dp_rank: int, dp_size: int,
                 micro_batches: int):
        if global_batch % (dp_size * micro_batches):
            raise ValueError(f"train.global_batch_size={global_batch}: must be a multiple of dp * micro_batches "
                             f"= {dp_size} * {micro_batches}")
        self.windows, self.seed = windows, seed
        self.global_batch, self.dp_rank, self.dp_size, self.micro_batches = global_batch, dp_rank, dp_size, micro_batches
        self.state = SamplerState()
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(len(self.windows), generator=g)}
        return self._perm_cache[epoch]

    def sample_ids(self, start: int, count: int) -> torch.Tensor:
        """Window ids of the global samples [start, start + count)."""
        n = len(self.windows)
        idx = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in torch.unique(idx // n).tolist():
            sel = (idx // n) == epoch
            out[sel] = self._epoch_perm(epoch)[idx[sel] % n]
        return out

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of the next step: micro_batches x (inputs, labels) of [B_micro, seq_len]."""
        per_rank = self.global_batch // self.dp_size
        start = self.state.samples_consumed + self.dp_rank * per_rank
        ids = self.sample_ids(start, per_rank)
        self.state.samples_consumed += self.global_batch
        x, y = self.windows.get(ids)
        return list(zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches)))

    def state_dict(self) -> dict:
        return {"samples_consumed": self.state.samples_consumed, "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.seed:
            raise ValueError(f"train.seed={self.seed}: the checkpoint's sampler was seeded with {sd['seed']}")
        self.state.samples_consumed = int(sd["samples_consumed"])


def validation_batches(windows: TokenWindows, num_batches: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                       micro_batches: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's micro-batches of the validation set.

    The set is num_batches x global_batch windows spread evenly over the split (a small split repeats windows), cut
    into batches exactly like training steps: rank d takes its contiguous share of each batch and splits it into
    micro_batches. The set depends only on (num_batches, global_batch, seq_len), so the validation loss is the same
    for any dp/pp layout; every micro-batch has the same size, so the mean of the micro-batch means is the token mean.
    """
    ids = torch.linspace(0, len(windows) - 1, num_batches * global_batch).long().view(num_batches, global_batch)
    per_rank = global_batch // dp_size
    mine = ids[:, dp_rank * per_rank:(dp_rank + 1) * per_rank].reshape(-1)
    x, y = windows.get(mine)
    micro = per_rank // micro_batches
    return list(zip(x.split(micro), y.split(micro)))
