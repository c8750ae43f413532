"""Gradient reduction across data-parallel replicas."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def average_gradients(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """Average .grad over `group` with a few flat all-reduces (buckets of ~25 MB) instead of one per tensor."""
    if group is None or dist.get_world_size(group) == 1:
        return
    size = dist.get_world_size(group)
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    nbytes = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        bucket.clear()

    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or nbytes + g.numel() * g.element_size() > BUCKET_BYTES):
            flush()
            nbytes = 0
        bucket.append(g)
        nbytes += g.numel() * g.element_size()
    flush()
