"""DualPipe's two copies of every part, summed while the pipeline is still draining.

DualPipe holds part p on rank p (direction 0) and on rank PP-1-p (direction 1); each copy sees half of the
micro-batches, so before the optimizer step both copies must hold the sum of their gradients (V3 §3.2.1: the
parameters are duplicated, the gradients reduced). Done after the step, blocking, that exchange is as long as several
micro-batches' compute on a small model, and nothing runs under it.

`MirrorExchange` starts each part's exchange as soon as this rank's copy has its final gradient, i.e. right after the
part's last backward action in the rank's list (a W, B, BW or the backward half of an FB), bucket by bucket while that
action is a W, and waits for all of them only before the optimizer: the exchanges of the part that finishes early
travel under the other part's remaining backward work, and most of the last part's under its own last W. Each part
has a two-rank process group of its own (created by parallel.mesh from `duplicated_parts`), so the exchanges never
meet the pipeline's activation traffic nor each other, whatever order the two ranks reach them in, on gloo as on NCCL.

The sum is an all-reduce of two: every element is a + b computed once and copied to both ranks, so both copies stay
bitwise equal (a + b == b + a in floating point, so whichever rank adds, the sum is the same).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .actions import Action, Layout


def used_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradients `module`'s backward writes: its own, and those of modules it reaches without
    registering them (`module.used_parameters()` where it says so)."""
    own = list(module.parameters())
    if not hasattr(module, "used_parameters"):
        return own
    seen = {id(p) for p in own}
    return own + [p for p in module.used_parameters() if id(p) not in seen]


def duplicated_parts(layout: Layout) -> dict[int, tuple[int, int]]:
    """part -> the two pipeline ranks holding a copy of it (only parts held twice, i.e. DualPipe's)."""
    holders: dict[int, set] = {}
    for s in range(layout.num_stages):
        holders.setdefault(layout.stage_to_part[s], set()).add(layout.stage_to_rank[s])
    out = {}
    for part, ranks in sorted(holders.items()):
        if len(ranks) == 2:
            out[part] = tuple(sorted(ranks))
    return out


def last_backward_index(actions: Sequence[Action]) -> dict[int, int]:
    """stage -> index in `actions` of the last action that writes gradients of the stage's parameters."""
    last = {}
    for i, a in enumerate(actions):
        if a.op in ("B", "W", "BW"):
            last[a.stage] = i
        elif a.op == "FB":
            last[a.stage2] = i
    return last


def flat_grads(params: Sequence[nn.Parameter]) -> torch.Tensor:
    """The gradients of `params` (zeros where missing) in one flat tensor."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def write_grads(params: Sequence[nn.Parameter], flat: torch.Tensor) -> None:
    """Inverse of flat_grads: copy the slices of `flat` into the parameters' gradients."""
    offset = 0
    for p in params:
        g = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


class _Bucket:
    """Parameters of one part summed by one all-reduce per dtype, on the part's group."""

    def __init__(self, params: list[nn.Parameter], group):
        self.params, self.group = params, group
        self.pending: list = []   # (params, flat sum buffer, Work)

    def start(self) -> None:
        by_dtype: dict = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for ps in by_dtype.values():
            flat = flat_grads(ps)
            self.pending.append((ps, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    def finish(self) -> None:
        for ps, flat, work in self.pending:
            work.wait()
            write_grads(ps, flat)
        self.pending = []


class MirrorExchange:
    """Sums the two copies of each duplicated part, each bucket's exchange started as soon as its gradients are final.

    Per step: the executor reports final gradients (`PipelineExecutor.run(..., grads_ready=exchange.stage_done)`):
    a whole stage after its last backward action, or single parameters while that action is a W; `finish()` then
    waits before the optimizer. `finish()` alone (no reports) sums every part after the step, the exchanges in flight together.

    A part's parameters are cut into buckets of about `bucket_elems` elements, in reverse order (the order a backward,
    and so a W, produces them); the buckets of a part start strictly in that order, so both ranks of a pair issue the
    same collectives in the same order on the part's group whatever their own action lists look like.
    """

    def __init__(self, stage_modules: dict[int, nn.Module], layout: Layout, groups: dict[int, object],
                 bucket_elems: int = 1 << 19):
        dup = duplicated_parts(layout)
        local = {layout.stage_to_part[s] for s in stage_modules} & set(dup)
        if set(groups) != local:
            raise ValueError(f"mirror groups for parts {sorted(groups)}: this rank holds duplicated parts "
                             f"{sorted(local)}")
        # a parameter shared by two local parts (tied weights) goes with the first part, in a fixed part order on
        # both ranks of a pair, is summed once, and is final only when every local stage holding it is done
        self._stages_of: dict[int, set[int]] = {}
        self._stage_params: dict[int, list[nn.Parameter]] = {}
        self.parts: list[list[_Bucket]] = []
        seen: set[int] = set()
        for s in sorted(stage_modules, key=lambda s: layout.stage_to_part[s]):
            params = [p for p in stage_modules[s].parameters() if p.requires_grad]
            # a stage may also write parameters another local part registers (the last part's multi-token
            # prediction reads the first part's embedding): those are final only once that stage is done too
            used = [p for p in used_parameters(stage_modules[s]) if p.requires_grad]
            self._stage_params[s] = used
            for p in used:
                self._stages_of.setdefault(id(p), set()).add(s)
            part = layout.stage_to_part[s]
            if part not in dup:
                continue
            own = [p for p in params if id(p) not in seen]
            seen.update(id(p) for p in own)
            buckets, current, size = [], [], 0
            for p in reversed(own):
                current.append(p)
                size += p.numel()
                if size >= bucket_elems:
                    buckets.append(_Bucket(current, groups[part]))
                    current, size = [], 0
            if current:
                buckets.append(_Bucket(current, groups[part]))
            self.parts.append(buckets)
        self._reset()

    def _reset(self) -> None:
        self._final: set[tuple[int, int]] = set()   # (id(param), stage) whose gradient is final
        self._next = [0] * len(self.parts)          # per part: the next bucket to start

    def _is_final(self, p: nn.Parameter) -> bool:
        return all((id(p), s) in self._final for s in self._stages_of[id(p)])

    def stage_done(self, stage: int, params: Optional[Sequence[nn.Parameter]] = None) -> None:
        """The gradients of `params` (default: every parameter) of `stage` are final for this step."""
        for p in (self._stage_params[stage] if params is None else params):
            self._final.add((id(p), stage))
        for i, buckets in enumerate(self.parts):
            while self._next[i] < len(buckets) and all(self._is_final(p) for p in buckets[self._next[i]].params):
                buckets[self._next[i]].start()
                self._next[i] += 1

    def finish(self) -> None:
        """Start what has not started yet, wait for every exchange and write the sums into the gradients."""
        for i, buckets in enumerate(self.parts):
            for b in buckets[self._next[i]:]:
                b.start()
        for buckets in self.parts:
            for b in buckets:
                b.finish()
        self._reset()


def build_mirror_exchange(stage_modules: dict[int, nn.Module], layout: Layout, groups: dict[int, object],
                          bucket_elems: int = 1 << 19) -> Optional[MirrorExchange]:
    """A MirrorExchange for a layout with duplicated parts (DualPipe), else None. `groups`: part -> the two-rank
    group of this rank's pair for that part (parallel.mesh: Mesh.mirror_groups(duplicated_parts(layout)))."""
    if not duplicated_parts(layout):
        return None
    return MirrorExchange(stage_modules, layout, groups, bucket_elems)
