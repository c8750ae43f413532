"""From a composed config to a written plan: validation, the search, the report files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from framework.config import ConfigError, _choice, _fail, _positive
from framework.plan.devices import DEVICE_NAMES, get_device
from framework.plan.estimate import GiB, Layout, Planner, Setting
from framework.plan.layers import gemm_shapes
from framework.plan.search import candidates, rank, table

PLAN_SCHEDULES = ("dualpipe", "dualpipev", "zb1p", "1f1b")


def validate_cluster(cfg) -> None:
    c, t = cfg.cluster, cfg.train
    _choice("cluster.gpu", c.gpu, DEVICE_NAMES)
    _positive("cluster.gpus", c.gpus)
    if c.gpus_per_node is not None:
        _positive("cluster.gpus_per_node", c.gpus_per_node)
    if c.memory_gb is not None:
        _positive("cluster.memory_gb", c.memory_gb)
    if not c.schedules:
        _fail("cluster.schedules", list(c.schedules), f"needs at least one of {', '.join(PLAN_SCHEDULES)}")
    for s in c.schedules:
        _choice("cluster.schedules", s, PLAN_SCHEDULES)
    if not c.micro_batch_sizes or min(c.micro_batch_sizes) < 1:
        _fail("cluster.micro_batch_sizes", list(c.micro_batch_sizes), "needs integers >= 1")
    _positive("cluster.train_tokens", c.train_tokens, zero_ok=True)
    _positive("cluster.top", c.top)
    for k in ("global_batch_size", "seq_len", "micro_batches"):
        _positive(f"train.{k}", getattr(t, k))
    if cfg.model.name != "deepseek_v3":
        _fail("model.name", cfg.model.name, "the planner models deepseek_v3 (MLA + MoE) layers")
    _choice("optim.state.exp_avg", cfg.optim.state.exp_avg, ("fp32", "bf16", "fp8"))
    _choice("optim.state.exp_avg_sq", cfg.optim.state.exp_avg_sq, ("fp32", "bf16", "fp8"))


def setting_from_config(cfg) -> Setting:
    t = cfg.train
    return Setting(gpus=cfg.cluster.gpus, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                   dtype_bytes=2 if t.dtype == "bfloat16" else 4, fp8=bool(cfg.fp8.enabled),
                   fp8_dispatch=bool(cfg.fp8.dispatch), zero=bool(cfg.optim.zero),
                   moments=(cfg.optim.state.exp_avg, cfg.optim.state.exp_avg_sq), overlap=bool(cfg.parallel.overlap),
                   comm_sms=int(cfg.parallel.comm.sm_budget))


def configured_layout(cfg) -> Layout | None:
    """The layout cfg.parallel / cfg.train ask for on cluster.gpus devices, or None if it is not one."""
    p, t, gpus = cfg.parallel, cfg.train, cfg.cluster.gpus
    if gpus % p.pp:
        return None
    dp = p.dp if p.dp is not None else gpus // p.pp
    if dp * p.pp != gpus or dp % p.ep or t.global_batch_size % (dp * t.micro_batches):
        return None
    if p.pp == 1:
        return Layout("single", 1, dp, p.ep, t.micro_batches, t.global_batch_size // (dp * t.micro_batches),
                      (cfg.model.num_hidden_layers,))
    if p.schedule not in PLAN_SCHEDULES:
        return None
    from schedules.stage import part_sizes
    num_parts = 2 * p.pp if p.schedule == "dualpipev" else p.pp
    sizes = tuple(part_sizes(cfg.model.num_hidden_layers, num_parts, p.layers_per_part))
    return Layout(p.schedule, p.pp, dp, p.ep, t.micro_batches, t.global_batch_size // (dp * t.micro_batches), sizes)


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename: a failed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def train_config(cfg, lay: Layout) -> str:
    """A primary config for launch.train (--config-dir DIR --config-name train_plan): conf/config.yaml with this
    plan's model, precision, optimizer and layout written out."""
    body = OmegaConf.to_container(cfg, resolve=True)
    layout = {"pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "layers_per_part": list(lay.layers_per_part) if lay.pp > 1
              else None, "schedule": lay.schedule if lay.pp > 1 else "1f1b"}
    out = {"defaults": ["config", "_self_"],
           "model": body["model"], "fp8": body["fp8"], "optim": body["optim"],
           "parallel": {**body["parallel"], **layout},
           "train": {k: body["train"][k] for k in ("global_batch_size", "seq_len", "dtype")}
           | {"micro_batches": lay.micro_batches}}
    out["model"].pop("vocab_size", None)   # follows data.vocab_size, as in conf/model/*.yaml
    if body["model"].get("vocab_size") != body["data"]["vocab_size"]:
        out["data"] = {"vocab_size": body["data"]["vocab_size"]}
        out["model"]["vocab_size"] = body["model"].get("vocab_size") or body["data"]["vocab_size"]
    header = (f"# Written by python -m launch.plan: {lay.schedule} pp={lay.pp} dp={lay.dp} ep={lay.ep}, "
              f"{lay.micro_batches} micro-batches of {lay.micro_batch_size} sequences per data-parallel rank.\n"
              f"# Run: torchrun --nproc-per-node=... -m launch.train --config-dir <this folder> "
              f"--config-name train_plan\n")
    return header + OmegaConf.to_yaml(OmegaConf.create(out))


def assumptions(dev) -> str:
    e = dev.eff
    lines = [f"device {dev.name}: {'measured now' if dev.measured else 'spec sheet (framework/plan/devices.py)'}; "
             f"matmul {dev.bf16_flops / 1e12:.4g} TFLOP/s"
             + (f", FP8 {dev.fp8_flops / 1e12:.4g}" if dev.fp8_flops else "")
             + f", memory {dev.hbm_bytes_s / 1e9:.4g} GB/s, {dev.memory_bytes / GiB:.4g} GiB",
             f"efficiencies: FP8 GEMM {e.gemm_fp8}, BF16 GEMM {e.gemm_bf16}, attention fwd {e.attn_fwd} / bwd "
             f"{e.attn_bwd}, memory {e.hbm}, NVLink {e.nvlink}, InfiniBand {e.ib} (sources: framework/plan/devices.py)",
             "kernels: " + ("fused (flash attention, V3's FP8 caching and recomputation, fused cross-entropy; "
                            "framework/plan/layers.py)" if dev.fused_kernels else
                            "this project's eager torch modules (what runs on cpu)")
             + "; MFU against the dense BF16 peak; gradient exchange after the pipeline counted as not overlapped"]
    if dev.measured:
        lines.append(f"host time per eager operator {dev.op_overhead_s * 1e6:.3g} us, per pipeline action "
                     f"{dev.action_overhead_s * 1e6:.3g} us; p2p latency {dev.link_latency_s * 1e6:.3g} us, bandwidth "
                     f"{dev.nvlink_bytes_s / 1e9:.3g} GB/s; runtime memory "
                     f"{dev.runtime_bytes / GiB:.3g} GiB (a trainer process without its model, measured); "
                     + (f"model's own layers {' / '.join(f'{v * 1e6:.3g}' for v in dev.layer_op_s)} us per "
                        f"operator in F / B / W; " if dev.layer_op_s else "")
                     + (f"log-softmax and loss {' / '.join(f'{v * 1e9:.3g}' for v in dev.logit_s)} ns per logit "
                        f"in F / B, zeroing {dev.zero_s * 1e12:.3g} ps per value; " if dev.logit_s else "")
                     + f"{len(dev.gemm_table)} linear shapes timed (the others by the 1024^2 GEMM's rate); small "
                     f"all-reduce {dev.allreduce_s * 1e6:.3g} us")
    return "\n".join(lines)


def make_plans(cfg, search: bool = True):
    """(ranked plans, the configured layout or None, device). search=False plans only the configured layout."""
    c = cfg.cluster
    given = configured_layout(cfg)
    # a measured device times the configured layout's own linears; other micro-batch sizes fall back to its GEMM rate
    shapes = gemm_shapes(cfg.model, given.micro_batch_size * cfg.train.seq_len, given.ep) \
        if given and c.gpu == "cpu" else ()
    # and the host time per operator of the model's own layers (framework/plan/host.py)
    host_model = OmegaConf.to_object(cfg.model) if c.gpu == "cpu" else None
    dev = get_device(c.gpu, c.memory_gb, c.gpus_per_node, processes=c.gpus, wandb_mode=cfg.logging.wandb.mode,
                     shapes=shapes, host_model=host_model)
    setting = setting_from_config(cfg)
    planner = Planner(cfg.model, dev, setting)
    if search:
        layouts = candidates(planner, list(c.schedules), [int(x) for x in c.micro_batch_sizes], given)
    else:
        layouts = [given] if given is not None else []
    if not layouts:
        raise ConfigError(f"train.global_batch_size={setting.global_batch_size}: no layout of {c.gpus} devices "
                          f"splits it into micro-batches of {list(c.micro_batch_sizes)} sequences "
                          f"(cluster.micro_batch_sizes) that the schedules accept")
    return rank([planner.plan(lay) for lay in layouts]), given, dev


def plan_from_config(cfg) -> str:
    c = cfg.cluster
    plans, given, dev = make_plans(cfg)
    setting = setting_from_config(cfg)
    best = plans[0]
    text = [f"# Plan: {cfg.model.name} ({c.gpus} x {dev.name}), {setting.global_batch_size} x {setting.seq_len} "
            f"tokens per step", "", table(plans, given, c.top), "", assumptions(dev),
            f"expert imbalance: the busiest ep rank gets (1 + {setting.expert_imbalance}) x the mean routed rows "
            f"(MaxVio_batch of loss-free balancing, framework/plan/estimate.py)"]
    if c.train_tokens:
        hours = c.train_tokens / 1e12 * best.gpu_hours_per_T
        text.append(f"whole run: {c.train_tokens:.4g} tokens = {hours:,.0f} GPU-hours "
                    f"({hours / c.gpus / 24:.1f} days on {c.gpus} devices) with layout 1")
    if not best.fits:
        text.append(f"no layout fits: the closest needs {best.over_bytes / GiB:.1f} GiB more per device")
    report = "\n".join(text)
    out = Path(c.out_dir)
    title = (f"{best.layout.schedule} pp={best.layout.pp} ep={best.layout.ep}: simulated step "
             f"{best.pipeline_s:.3g} s, bubble {best.bubble:.1%}")
    from schedules.timeline import draw_gantt
    timelines = best.sim.timelines if best.layout.pp > 1 else None
    if timelines:
        _atomic_write(out / "gantt.png", lambda p: draw_gantt(timelines, p, title))
    elif (out / "gantt.png").exists():
        (out / "gantt.png").unlink()     # an earlier plan's chart would describe another layout
    _atomic_write(out / "train_plan.yaml", lambda p: Path(p).write_text(train_config(cfg, best.layout)))
    _atomic_write(out / "plan.md", lambda p: Path(p).write_text(report + "\n"))
    return report + f"\nwrote {out}/plan.md, {out}/train_plan.yaml" + (f", {out}/gantt.png" if timelines else "")
