"""ZeRO-1: flat buckets of parameters whose optimizer state is split over the ranks that replicate them.

A bucket lays its parameters end to end in one flat fp32 buffer. Each parameter starts at a multiple of `align`
(the fp8 block: no quantization block straddles two parameters, so a parameter's blocks, and its checkpoint, are the
same at every data-parallel size) and the buffer is padded to a multiple of align * world, so that every rank owns an
equal, block-aligned shard [shard_start, shard_start + shard_numel):

    params   |--- p0 ---|pad|------- p1 -------|pad|-- p2 --|pad ...|
    shards   |<----- rank 0 ----->|<----- rank 1 ----->|<-- rank 2 ...

One step of a sharded bucket (the only communication of ZeRO-1):
    local grads --flatten--> [total] --reduce-scatter (sum) / dp--> my shard of the averaged gradient [shard]
        (or, when the caller has already reduced the gradients, my shard is cut from them: no communication)
    AdamW on my shard of master weights and moments (fp32 math, moments re-quantized)
    my updated shard --cast to the param dtype--> all-gather --> [total] --> every rank's working params
With world == 1 the manager updates every parameter where it lies instead (manager.py): no flat copies.

The collectives use reduce_scatter_single / all_gather_single (gloo supports both in torch 2.13); on a torch that has
neither spelling, a reduce-scatter falls back to all_reduce + slice. All-gathers move raw bytes (a uint8 view), so
any dtype travels, fp8 included (gloo has no fp8 type).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass
class BucketLayout:
    numels: list[int]        # logical size of each parameter
    offsets: list[int]       # where each starts in the flat buffer (multiples of align)
    spans: list[int]         # numel rounded up to align: the positions each parameter owns
    total: int               # flat buffer length, a multiple of align * world
    world: int
    rank: int

    @classmethod
    def build(cls, numels: list[int], align: int, world: int = 1, rank: int = 0) -> "BucketLayout":
        spans = [_ceil_to(n, align) for n in numels]
        offsets, at = [], 0
        for s in spans:
            offsets.append(at)
            at += s
        return cls(list(numels), offsets, spans, _ceil_to(max(at, 1), align * world), world, rank)

    @property
    def shard_numel(self) -> int:
        return self.total // self.world

    @property
    def shard_start(self) -> int:
        return self.rank * self.shard_numel

    def pieces(self):
        """For each parameter i that overlaps this rank's shard: (i, lo, hi, at): positions [lo, hi) of its span
        (in its own flat coordinates) sit at shard position `at`."""
        start, end = self.shard_start, self.shard_start + self.shard_numel
        for i, (off, span) in enumerate(zip(self.offsets, self.spans)):
            lo, hi = max(off, start), min(off + span, end)
            if lo < hi:
                yield i, lo - off, hi - off, lo - start


def flatten_into(flat: torch.Tensor, tensors, layout: BucketLayout) -> torch.Tensor:
    """Copy each tensor (or skip None) into its place in flat [total], casting to flat's dtype."""
    for t, off, n in zip(tensors, layout.offsets, layout.numels):
        if t is not None:
            flat[off:off + n].copy_(t.reshape(-1))
    return flat


def reduce_scatter_sum(flat: torch.Tensor, layout: BucketLayout, group) -> torch.Tensor:
    """flat [total] local values -> this rank's shard [shard_numel] of their sum over the group."""
    if layout.world == 1:
        return flat
    shard = torch.empty(layout.shard_numel, dtype=flat.dtype, device=flat.device)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
    if reduce_scatter is not None:
        reduce_scatter(shard, flat, op=dist.ReduceOp.SUM, group=group)
    else:  # older torch: reduce everything, keep my slice
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        shard.copy_(flat[layout.shard_start:layout.shard_start + layout.shard_numel])
    return shard


def all_gather_shards(shard: torch.Tensor, layout: BucketLayout, group) -> torch.Tensor:
    """Every rank's equal-sized shard [k] -> the concatenation [world * k], in rank order, any dtype."""
    if layout.world == 1:
        return shard
    shard = shard.contiguous()
    out = torch.empty(layout.world * shard.numel(), dtype=shard.dtype, device=shard.device)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(out.view(torch.uint8), shard.view(torch.uint8), group=group)
    return out
