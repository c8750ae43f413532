"""One entry applies parallelism to a built model: parallelize(model, cfg, mesh) -> step function.

In this order, each a small function below:
  shard_experts        parallel.ep > 1: each rank keeps its experts, tokens travel by all-to-all (parallel/expert.py)
  swap_linears         fp8.enabled: block-scaled FP8 GEMMs (V3 §3.3); train.dtype=bf16_emulated: bf16-rounded GEMMs
  split_weight_grads   parallel.pp > 1: every weight's gradient can wait for the schedule's W actions
  split_pipeline       parallel.pp > 1: the model cut into parts; this rank's stages and action list
  mirror_exchange      DualPipe: the two copies of each part summed over the mesh's mirror groups
and returns a LocalStep (pp = 1) or a PipelineStep (framework/train_step.py). The launcher and the trainer change a
model through nothing else. `build_mesh(cfg)` creates every process group the run needs, DualPipe's pairs included.
"""
from __future__ import annotations

import logging

import torch.nn as nn

from framework.config import ConfigError
from framework.models.capabilities import check_capabilities
from framework.train_step import LocalStep, PipelineStep
from parallel.mesh import Mesh, init_mesh

log = logging.getLogger("duet")


def build_mesh(cfg) -> Mesh:
    """The mesh of cfg.parallel with all its process groups (the mirror groups of cfg's layout too). Collective."""
    p = cfg.parallel
    return init_mesh(p.pp, p.dp, p.ep, cfg.train.device, p.backend, p.timeout_s, p.comm.sm_budget,
                     mirror_pairs=mirror_pairs(p.schedule, p.pp))


def mirror_pairs(schedule: str, pp: int) -> dict[int, tuple[int, int]]:
    """part -> the two pipeline ranks that hold it (DualPipe); empty where every part is held once."""
    if pp == 1:
        return {}
    from schedules import get_layout
    from schedules.mirror import duplicated_parts

    return duplicated_parts(get_layout(schedule, pp))


def parallelize(model: nn.Module, cfg, mesh: Mesh) -> LocalStep | PipelineStep:
    """Apply cfg's parallelism to `model` (built identically on every rank) in place; returns its step function.
    Collective where the mesh is distributed (the mirror groups, the expert-parallel checks)."""
    check_supported(model, cfg, mesh)
    shard_experts(model, cfg, mesh)
    swap_linears(model, cfg)
    if mesh.pp == 1:
        return LocalStep(model, mesh)
    return pipeline_step(model, cfg, mesh)


def check_supported(model: nn.Module, cfg, mesh: Mesh) -> None:
    """What the config alone cannot tell (config.validate checked the rest): the mesh was built for this config,
    and the model can do what the config asks of it. One line naming the key."""
    check_capabilities(model)
    p = cfg.parallel
    dp = p.dp if p.dp is not None else mesh.dp
    for key, asked, built in (("parallel.pp", p.pp, mesh.pp), ("parallel.dp", dp, mesh.dp),
                              ("parallel.ep", p.ep, mesh.ep)):
        if asked != built:
            raise ConfigError(f"{key}={asked}: the mesh was built with {built}; build it from the same config "
                              f"(framework.parallelize.build_mesh)")
    if mesh.ep > 1 and model.moe_layers() == 0:
        raise ConfigError(f"parallel.ep={mesh.ep}: {type(model).__name__} has no MoE layers to shard; use "
                          f"parallel.ep=1")
    if mesh.pp > 1:
        check_pipeline(model, cfg, mesh)


def check_pipeline(model: nn.Module, cfg, mesh: Mesh) -> None:
    """The schedule runs on these many ranks and micro-batches, and places what the model shares across parts."""
    from schedules import check_args, get_layout

    p = cfg.parallel
    check_args(p.schedule, mesh.pp, cfg.train.micro_batches)
    layout = get_layout(p.schedule, mesh.pp)
    ranks_of = lambda test: {layout.stage_to_rank[s] for s in range(layout.num_stages) if test(s)}  # noqa: E731
    if model.head_reads_embedding() and ranks_of(layout.is_last) != ranks_of(layout.is_first):
        raise ConfigError(f"parallel.schedule={p.schedule}: multi-token prediction needs the embedding on the last "
                          f"stage's rank (use dualpipe or dualpipev, or model.num_nextn_predict_layers=0)")


def shard_experts(model: nn.Module, cfg, mesh: Mesh) -> None:
    """Each ep rank keeps its slice of every MoE layer's experts (same init on every rank) and exchanges tokens."""
    if mesh.ep > 1:
        from framework.models.expert_parallel import apply_expert_parallel
        apply_expert_parallel(model, mesh, cfg)


def swap_linears(model: nn.Module, cfg) -> None:
    """FP8 GEMMs, or bf16-rounded ones, in place of the model's linears and expert GEMMs (fp8.exclude kept)."""
    if cfg.fp8.enabled:
        from framework.fp8 import convert_to_fp8
        convert_to_fp8(model, exclude=list(cfg.fp8.exclude), backend=cfg.fp8.backend, pow2=cfg.fp8.pow2_scales)
    elif cfg.train.dtype == "bf16_emulated":
        from framework.fp8.bf16_emulation import convert_to_bf16_emulation
        convert_to_bf16_emulation(model, exclude=list(cfg.fp8.exclude))


def split_weight_grads(model: nn.Module) -> None:
    """B computes input gradients, W the deferred weight gradients (plain linears and embeddings swapped in place;
    FP8 and emulated layers declare their own split)."""
    from schedules.weight_grad import enable_weight_grad_split
    enable_weight_grad_split(model)


def split_pipeline(model: nn.Module, cfg, mesh: Mesh):
    """(layout, this rank's actions, {stage: part}) of cfg's schedule over the mesh's pipeline ranks."""
    from schedules import build, get_layout
    from schedules.stage import split_model
    from schedules.weight_grad import undeferred_weights

    p, n = cfg.parallel, cfg.train.micro_batches
    layout = get_layout(p.schedule, mesh.pp)
    parts = split_model(model, layout.num_parts, p.layers_per_part)
    stages = {s: parts[layout.stage_to_part[s]] for s in layout.stages_of(mesh.pp_rank)}
    for part in stages.values():
        part.loss_scale = 1.0 / n
        part.overlap = p.overlap         # F&B pairs hide one chunk's all-to-all under the other's compute
        part.recompute = p.recompute     # RMSNorm and SwiGLU outputs recomputed in backward (V3 §3.3)
    # a weight whose layer cannot defer its gradient keeps it in B, which the schedule's bubble does not expect
    stuck = undeferred_weights(model, [m for part in stages.values() for m in part.modules()])
    if stuck:
        log.warning(f"weight gradients computed in B, not deferred to W, on pipeline rank {mesh.pp_rank}: "
                    f"{', '.join(stuck)}")
    return layout, build(p.schedule, mesh.pp, n)[mesh.pp_rank], stages


def mirror_exchange(stages: dict, layout, mesh: Mesh):
    """DualPipe: each part's two copies summed as soon as this rank's copy is final (schedules/mirror.py)."""
    from schedules.mirror import build_mirror_exchange, duplicated_parts

    if not mesh.distributed:
        return None
    return build_mirror_exchange(stages, layout, mesh.mirror_groups(duplicated_parts(layout)))


def pipeline_step(model: nn.Module, cfg, mesh: Mesh) -> PipelineStep:
    """The pipeline half of parallelize, for a model whose experts and linears are already as wanted."""
    from schedules.executor import PipelineExecutor

    t = cfg.train
    check_pipeline(model, cfg, mesh)
    split_weight_grads(model)
    layout, actions, stages = split_pipeline(model, cfg, mesh)
    mirror = mirror_exchange(stages, layout, mesh)
    micro = t.global_batch_size // (mesh.dp * t.micro_batches)
    executor = PipelineExecutor(layout, stages, group=mesh.pp_group,
                                p2p_shapes=[[micro, t.seq_len, model.config.hidden_size]],
                                p2p_dtype=next(model.parameters()).dtype, device=mesh.device)
    return PipelineStep(model, mesh, layout, actions, stages, executor, t.micro_batches, mirror)
