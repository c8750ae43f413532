"""Gradient reduction across data-parallel replicas, expert-parallel aware.

Every data-parallel rank r computes L_r, the mean loss over its own micro-batches, and backpropagates it; the step
must leave in .grad the gradient of the global mean loss L = (1/dp) * sum_r L_r (equal local batches).

- Dense (replicated) parameters: .grad on rank r is dL_r/dθ, so dL/dθ = mean over dp_group.
- Routed-expert parameters (p._duet_expert, set by parallel.expert): rank r holds experts that also processed the
  tokens of its ep peers, and the all-to-all backward delivered those peers' gradients too, so .grad on rank r is
  already sum_{r' in ep_group(r)} dL_{r'}/dθ. The replicas of the same experts are the edp_group (one per ep slice),
  whose ep_groups partition the dp ranks, hence
      sum over edp_group of .grad = sum_{all dp ranks r} dL_r/dθ   and   dL/dθ = that sum / dp.
  With ep == dp the edp_group has one rank and only the division by dp remains.

ZeRO-1 (framework/optim/zero.py) shards optimizer state over the same groups: `reduction_groups` says which.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def is_expert_param(p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "_duet_expert", False))


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce_bucketed(grads: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup], scale: float) -> None:
    """grads <- scale * sum over `group`, with a few flat all-reduces (buckets of ~25 MB, one dtype each)."""
    communicate = _group_size(group) > 1
    if not communicate:
        if scale != 1.0:
            for g in grads:
                g.mul_(scale)
        return
    bucket: list[torch.Tensor] = []
    nbytes = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
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


def average_gradients(params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """Average .grad over `group` with a few flat all-reduces (buckets of ~25 MB) instead of one per tensor."""
    if group is None or dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    _all_reduce_bucketed(grads, group, 1.0 / dist.get_world_size(group))


def reduction_groups(named_params, mesh) -> dict[str, tuple[Optional[dist.ProcessGroup], list]]:
    """{"dense": (dp_group, [(name, p), ...]), "expert": (edp_group, [...])}: the replicas each parameter agrees with
    (the group its gradient is reduced over and its optimizer state may be sharded over)."""
    dense, expert = [], []
    for name, p in named_params:
        (expert if is_expert_param(p) else dense).append((name, p))
    return {"dense": (mesh.dp_group, dense), "expert": (mesh.edp_group, expert)}


def reduce_gradients(named_params, mesh) -> None:
    """Leave the gradient of the global-batch mean loss in every .grad (see the module docstring for the scaling):
    dense grads averaged over dp_group, expert grads summed over edp_group and divided by dp."""
    groups = reduction_groups(named_params, mesh)
    dense_group, dense = groups["dense"]
    expert_group, expert = groups["expert"]
    _all_reduce_bucketed([p.grad for _, p in dense if p.grad is not None], dense_group, 1.0 / mesh.dp)
    _all_reduce_bucketed([p.grad for _, p in expert if p.grad is not None], expert_group, 1.0 / mesh.dp)


def grad_norm_sq_share(named_params, mesh) -> torch.Tensor:
    """This rank's share of the squared gradient norm after reduce_gradients: summed over all ranks it gives the
    global squared norm, because each distinct gradient is counted by exactly one rank of its replica group (dense
    ones by dp rank 0, expert ones by the first ep slice, dp rank < ep; pipeline stages hold disjoint parameters)."""
    total = torch.zeros((), dtype=torch.float64)
    for _, p in named_params:
        if p.grad is None:
            continue
        owner = mesh.dp_rank < mesh.ep if is_expert_param(p) else mesh.dp_rank == 0
        if owner:
            total += p.grad.double().pow(2).sum().cpu()
    return total
