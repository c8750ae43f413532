"""Expert parallelism applied to a model: every MoE layer keeps one ep rank's experts and exchanges its tokens.

parallel/expert.py moves rows between ranks and knows no model; this module walks the model and asks each layer
that holds routed experts (`shard_experts`, MoE in deepseek_v3/moe.py) to keep its slice and use the dispatcher.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
import torch.nn as nn

from framework.models.deepseek_v3.moe import Experts
from parallel import exchanges
from parallel.expert import ExpertParallelDispatcher, local_expert_range


def mark_expert_params(module: nn.Module) -> None:
    """Flag routed-expert parameters: data_parallel.reduce_gradients reduces them over edp_group, not dp_group."""
    for m in module.modules():
        if isinstance(m, Experts):
            for p in m.parameters():
                p._duet_expert = True


def apply_expert_parallel(model: nn.Module, mesh, cfg=None, fp8_dispatch: Optional[bool] = None,
                          link: Optional[exchanges.EmulatedLink] = None,
                          recorder: Optional[exchanges.CommRecorder] = None,
                          layout: Optional[str] = None) -> nn.Module:
    """Shard every MoE layer of `model` over mesh.ep_group, in place; returns the model.

    Each MoE keeps only this rank's experts, copied from the full (or larger) Experts module it had, so a model built
    with the same seed on every rank holds exactly the experts of the single-process model; the layer gets an
    ExpertParallelDispatcher. Expert parameters are marked (p._duet_expert). cfg (the full Config, optional) supplies
    fp8.dispatch, parallel.comm.emulate_link and parallel.comm.dispatch (the layout); explicit arguments win. The
    dispatch payload always uses power-of-two scales, as V3 §3.3 does (fp8.pow2_scales is about the GEMMs). With
    ep == 1 the experts are only marked.
    """
    pow2 = True
    if cfg is not None:
        fp8_dispatch = bool(cfg.fp8.dispatch) if fp8_dispatch is None else fp8_dispatch
        link = link if link is not None else exchanges.EmulatedLink.from_config(cfg.parallel.comm.emulate_link)
        layout = layout or getattr(cfg.parallel.comm, "dispatch", None)
    fp8_dispatch, layout = bool(fp8_dispatch), layout or "counts"
    if mesh.ep > 1:
        if mesh.ep_group is None:
            raise ValueError(f"parallel.ep={mesh.ep}: the mesh has no expert-parallel group (single process?)")
        if dist.get_rank(mesh.ep_group) != mesh.ep_rank:
            raise ValueError(f"ep_group rank {dist.get_rank(mesh.ep_group)} != mesh.ep_rank {mesh.ep_rank}: "
                             f"experts would be misplaced")
    for name, moe in model.named_modules():
        if not hasattr(moe, "shard_experts"):
            continue
        if mesh.ep > 1:
            local = local_expert_range(moe.n_experts, mesh.ep, mesh.ep_rank)
            moe.shard_experts(local, ExpertParallelDispatcher(moe.n_experts, mesh.ep_group, fp8=fp8_dispatch,
                                                              pow2_scales=pow2, link=link, recorder=recorder,
                                                              name=name or "moe", layout=layout))
        mark_expert_params(moe)
    return model


def expert_ranges(model: nn.Module, named) -> dict[str, range]:
    """{parameter name: the experts it holds} for the (name, parameter) pairs of `named` that belong to a module holding
    a slice of the experts, so that a checkpoint can key each rank's slice by its range."""
    ranges = {id(p): m.expert_ids for m in model.modules() if isinstance(getattr(m, "expert_ids", None), range)
              for p in m.parameters(recurse=False)}
    return {n: ranges[id(p)] for n, p in named if id(p) in ranges}
