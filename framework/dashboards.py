"""What each mechanism reports to the dashboards (W&B on rank 0, metrics.jsonl): per-step numbers and images.

Every step (reduced over ranks before rank 0 logs them):
  comm/*       exposed communication of the expert all-to-all (parallel.exchanges.TRACE: time waited vs time in flight)
  fp8/*        FP8 saturation and underflow of the quantized GEMM operands (framework.fp8.metrics.fp8_metrics)
  mem/*        process resident memory, and the CUDA allocator's peak on GPUs (max over ranks)
Every logging.dashboard_interval steps (and at step 1):
  optim/*      optimizer bytes per parameter (the state manager's memory_report(), or counted for torch's AdamW)
  pipeline/*   measured bubble of the step's action timeline, and its Gantt chart as an image
  moe/expert_load   heatmap image of tokens per expert and layer, relative to the layer's mean
The panel names are fixed: PANELS below is the list the README documents.
"""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# panel name -> what it shows (README "Dashboards")
PANELS = {
    "loss": "the training objective, mean over the global batch: loss/main + MTP weight x loss/mtp + loss/balance",
    "loss/main": "next-token loss of the main head",
    "loss/total": "the objective as the model reports it (equals loss)",
    "loss/mtp": "multi-token prediction loss, mean over depths (V3 §2.2)",
    "loss/balance": "sequence-wise / auxiliary balance loss, when enabled",
    "val/loss": "validation loss (every train.eval_interval steps)",
    "val/maxvio_global": "MaxVio over the validation set, mean over MoE layers (V3 §2.1.2)",
    "lr": "learning rate",
    "grad_norm": "global gradient norm before clipping",
    "skipped_steps": "1 when the step was skipped for a non-finite loss or gradient",
    "skipped_steps_total": "skipped steps so far",
    "tokens_per_s": "training throughput of the whole job",
    "mfu": "model FLOPs utilisation against the measured matmul peak of the device",
    "step_time_s": "wall time of one optimizer step",
    "moe/maxvio_batch": "MaxVio of the step's global batch, mean over MoE layers",
    "moe/maxvio_layer{i}": "MaxVio of MoE layer i",
    "moe/expert_load": "image: tokens per expert (columns) and MoE layer (rows) / layer mean",
    "pipeline/bubble": "measured idle fraction of the step, mean over pipeline ranks",
    "pipeline/bubble_max": "measured idle fraction of the worst pipeline rank",
    "pipeline/timeline": "image: Gantt chart of the step's F / B / W / F&B actions per pipeline rank",
    "comm/exposed_frac": "share of the all-to-all time the step waited for (0 = fully hidden)",
    "comm/exposed_s": "seconds per step spent waiting for all-to-all results",
    "comm/comm_s": "seconds per step the all-to-all exchanges were in flight",
    "fp8/{x,w,dy}_saturated_frac": "share of FP8 operand values clipped at the format's maximum",
    "fp8/{x,w,dy}_underflow_frac": "share of non-zero FP8 operand values flushed to zero",
    "fp8/{x,w,dy}_amax": "largest absolute operand value",
    "fp8/{x,w,dy}_underflow_frac_max": "underflow share of the worst layer",
    "fp8/sites": "FP8 GEMM sites that reported",
    "optim/bytes_per_param": "weights + master + gradients + moments, bytes per parameter (V3 §3.3.3)",
    "optim/moment_bytes_per_param": "optimizer moments alone, bytes per parameter",
    "mem/rss_gb": "resident memory of the largest process",
    "mem/rss_peak_gb": "peak resident memory of the largest process",
    "mem/cuda_max_allocated_gb": "peak CUDA allocation of the largest process (GPU runs)",
}


class Dashboards:
    def __init__(self, cfg, run_dir: Path, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.interval = cfg.logging.dashboard_interval
        self.folder = Path(run_dir) / "dashboards"
        self.fp8 = bool(cfg.fp8.enabled)
        self._t0 = 0.0

    def due(self, step: int) -> bool:
        """Images and the slower reports at step 1 and every `interval` steps (step = the step being run, 1-based)."""
        return bool(self.interval) and (step == 1 or step % self.interval == 0)

    # -- per step ---------------------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        self._t0 = time.perf_counter()

    def wants_trace(self, step: int) -> bool:
        """Whether the step function should record its action timeline (pipelines, on picture steps)."""
        return self.mesh.pp > 1 and self.due(step)

    def local_scalars(self, models) -> dict:
        """This rank's numbers (the trainer averages them over the ranks that report them)."""
        out = comm_scalars(self._t0)
        if self.fp8:
            out.update(fp8_scalars(models))
        return out

    def memory(self) -> dict:
        """Largest process's resident memory (and CUDA peak): a job fails on its fullest rank."""
        rss, peak = rss_bytes()
        vals = [rss, peak, torch.cuda.max_memory_allocated() if self.mesh.device.type == "cuda" else 0.0]
        t = torch.tensor(vals, dtype=torch.float64)
        if self.mesh.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = {"mem/rss_gb": t[0].item() / 2**30, "mem/rss_peak_gb": t[1].item() / 2**30}
        if self.mesh.device.type == "cuda":
            out["mem/cuda_max_allocated_gb"] = t[2].item() / 2**30
        return out

    # -- pictures (collective: every rank calls them at the same steps) ---------------------------------------------
    def pipeline(self, result, step: int, metrics) -> dict:
        """`result`: the step's StepOutput, traced when wants_trace(step) said so (its timeline: this rank's
        (start time, [(start, end, what)]) of actions and waits)."""
        if not self.wants_trace(step):
            return {}
        timeline = result.timeline
        gathered = [None] * self.mesh.world_size if self.mesh.distributed else [timeline]
        if self.mesh.distributed:
            dist.all_gather_object(gathered, timeline)
        traces = [gathered[r] for r in self.mesh.pipeline_ranks(0)]   # one pipeline: data-parallel rank 0's
        if any(t is None or not t[1] for t in traces):
            return {}
        origin = min(t[0] for t in traces)
        compute, comm = [], []
        for start, spans in traces:
            shift = start - origin                     # wall clocks line the ranks up (same host: exact enough)
            compute.append([(s + shift, e + shift, w) for s, e, w in spans if not w.startswith("wait")])
            comm.append([(s + shift, e + shift, w) for s, e, w in spans if w.startswith("wait")])
        from schedules.timeline import draw_gantt, measured_bubble

        bubbles = measured_bubble(compute)
        if self.mesh.rank == 0:
            path = self._path("pipeline_timeline", step)
            draw_gantt(compute, str(path), title=f"step {step}: {self.cfg.parallel.schedule}, pp={self.mesh.pp}",
                       comm=comm)
            metrics.log_image(step, "pipeline/timeline", str(path))
        return {"pipeline/bubble": sum(bubbles) / len(bubbles), "pipeline/bubble_max": max(bubbles)}

    def expert_load(self, loads: Optional[torch.Tensor], step: int, metrics) -> None:
        if loads is None or loads.numel() == 0 or self.mesh.rank != 0 or not self.due(step):
            return
        path = self._path("expert_load", step)
        draw_expert_load(loads, str(path), title=f"step {step}: tokens per expert / layer mean")
        metrics.log_image(step, "moe/expert_load", str(path))

    def _path(self, name: str, step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{name}_{step:08d}.png"


def comm_scalars(since: float) -> dict:
    """Exposed-communication numbers of the exchanges that started after `since` (perf_counter seconds)."""
    from parallel.exchanges import TRACE

    recs = [r for r in TRACE.resolved() if r.start >= since]
    if not recs:
        return {}
    comm = sum(r.duration for r in recs)
    # the part of an exchange's flight the caller spent waiting (its wait() also covers bookkeeping after the end)
    exposed = sum(min(r.waited, r.duration) for r in recs)
    return {"comm/comm_s": comm, "comm/exposed_s": exposed, "comm/exposed_frac": exposed / comm if comm > 0 else 0.0}


def fp8_scalars(models) -> dict:
    """Per-role FP8 summary over this rank's layers, counters reset after the read."""
    from framework.fp8.metrics import fp8_metrics

    return fp8_metrics(list(models), reset=True)


def rss_bytes() -> tuple[float, float]:
    """(current, peak) resident set size of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0   # Linux reports KiB
    try:
        with open("/proc/self/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        current = peak
    return float(current), max(peak, float(current))   # the two counters round differently


def optimizer_bytes(optimizer, params) -> dict:
    """Bytes per parameter of the training state on this rank: weights + master + gradients + moments."""
    report = getattr(optimizer, "memory_report", None)
    if report is not None:
        r = report()
        return {"optim/bytes_per_param": r["total"], "optim/moment_bytes_per_param": r["moments"]}
    n = sum(p.numel() for p in params)
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    weights = sum(size(p) for p in params)
    grads = sum(size(p.grad) for p in params if p.grad is not None)
    moments = sum(size(v) for st in optimizer.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"optim/bytes_per_param": (weights + grads + moments) / max(n, 1),
            "optim/moment_bytes_per_param": moments / max(n, 1)}


def draw_expert_load(loads: torch.Tensor, path: str, title: str = "") -> None:
    """Heatmap of [MoE layer, expert] token counts divided by each layer's mean (1.0 = perfectly balanced)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from framework.models.capabilities import max_vio

    loads = loads.double()
    rel = loads / loads.mean(dim=-1, keepdim=True).clamp_min(1e-12)             # [L, E]
    L, E = rel.shape
    fig = Figure(figsize=(max(4.0, min(20.0, 0.25 * E + 2)), max(2.0, min(12.0, 0.35 * L + 1.2))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(2.0, float(rel.max())))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    vio = max_vio(loads).mean().item()
    ax.set_title(f"{title}  (MaxVio {vio:.3f})".strip(), fontsize=8)
    fig.colorbar(im, ax=ax, label="load / mean")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
