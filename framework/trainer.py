"""The step loop, and nothing else: data -> step function -> optimizer -> balancing -> metrics -> checkpoint."""
from __future__ import annotations

import base64
import contextlib
import functools
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from framework import faults
from framework.checkpoint import CheckpointError, Checkpointer, expert_slice_key
from framework.config import to_container
from framework.dashboards import Dashboards, optimizer_bytes
from framework.data.dataset import Sampler, TokenWindows, validation_batches
from framework.data.prepare import prepare
from framework.metrics import build_metrics, redact
from framework.models import build_model
from framework.models.capabilities import max_vio
from framework.models.expert_parallel import expert_ranges
from framework.optim.lr import make_scheduler
from framework.parallelize import parallelize
from framework.resume import apply_schedule, check_data, data_identity, decide
from framework.runlock import RunLock
from framework.watchdog import STALL_EXIT, Watchdog
from parallel.mesh import Mesh


log = logging.getLogger("duet")


class TrainingAborted(RuntimeError):
    """Training cannot go on (non-finite steps, a hung or dead rank). str(err) is one line; exit_code for the CLI."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def is_comm_failure(err: BaseException) -> bool:
    """A collective that failed because a peer is gone or late (gloo/NCCL timeouts, closed connections)."""
    if isinstance(err, CheckpointError):       # already one line (a full disk, a bad checkpoint)
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        w in text for w in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))


def prepare_data(cfg, mesh: Mesh):
    """Rank 0 builds the token cache (if missing) while the others wait, then everyone opens it."""
    d = cfg.data
    args = (d.path, d.cache_dir, d.vocab_size, d.val_fraction, d.max_bytes, d.dtype, d.tokenizer, d.text_field,
            d.mix)
    if mesh.rank == 0:
        prepared = prepare(*args)
    if mesh.distributed:
        dist.barrier()
    if mesh.rank != 0:
        prepared = prepare(*args)
    if prepared.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the data's vocabulary "
                         f"({prepared.vocab_size}, {prepared.folder}/meta.json)")
    return prepared


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Achievable matmul FLOP/s of this device, measured: the denominator of MFU when no spec sheet applies.
    (On CPU there is no published peak for the 2-thread sandbox; a square GEMM is the honest ceiling.)"""
    n = 1024 if device.type == "cpu" else 8192
    gen = torch.Generator(device=device).manual_seed(0)   # not the global RNG: a resumed run draws what an
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)   # uninterrupted one does
    best = math.inf
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def adamw_param_groups(named_params, weight_decay: float):
    """Decay matrices, not norms, biases or router biases (nanoGPT's rule)."""
    decay = [p for _, p in named_params if p.dim() >= 2]
    no_decay = [p for _, p in named_params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg, named_params, mesh=None):
    """AdamW through the optimizer-state manager: fp32 | bf16 | fp8 moments, ZeRO-1 over the data-parallel ranks
    with optim.zero. With fp32 moments it equals torch.optim.AdamW bit for bit. The trainer reduces and clips the
    gradients itself (it needs the global norm and the finite check), so the manager does not reduce them again."""
    from framework.optim.manager import OptimizerStateManager

    o = cfg.optim
    zero = o.zero and mesh is not None and mesh.dp > 1
    return OptimizerStateManager(adamw_param_groups(named_params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                 eps=o.eps, weight_decay=o.weight_decay, exp_avg=o.state.exp_avg,
                                 exp_avg_sq=o.state.exp_avg_sq, names={p: n for n, p in named_params},
                                 dp_group=mesh.dp_group if zero else None,
                                 expert_dp_group=mesh.edp_group if zero else None, average_grads=False)


def _rng_state_b64() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


class Trainer:
    def __init__(self, cfg, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        t = cfg.train
        faults.active()                        # a malformed DUET_FAULT fails here, not in the middle of the run
        torch.manual_seed(t.seed)
        self.run_dir = Path(t.output_dir)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16_emulated": torch.float32}[t.dtype]
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", t.keep_checkpoints)
        self.lock = RunLock(self.run_dir, cfg.run_id) if mesh.rank == 0 else None
        self.resume_from = decide(cfg, self.ckpt, mesh.rank, mesh.distributed, self.lock)  # before anything is written
        try:
            self._build(cfg, mesh)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the run folder back (rank 0's lock). fit() does it when it ends."""
        if self.lock is not None:
            self.lock.release()

    def _build(self, cfg, mesh: Mesh) -> None:
        t = cfg.train
        prepared = prepare_data(cfg, mesh)
        self.data_identity = data_identity(prepared.folder)
        self.train_windows = TokenWindows(prepared.train_bin, prepared.dtype, t.seq_len, prepared.vocab_size)
        val_windows = TokenWindows(prepared.val_bin, prepared.dtype, t.seq_len, prepared.vocab_size)

        model_cfg = OmegaConf.to_object(cfg.model)
        self.model = build_model(model_cfg).to(device=mesh.device, dtype=self.dtype)
        if cfg.model.init_from:  # the full model first: every layout below copies or slices these weights
            from framework.models.init_from import load_init_from
            load_init_from(self.model, cfg.model.init_from)
        self.step_fn = parallelize(self.model, cfg, mesh)   # experts, FP8, pipeline: this rank's step function
        named = self.step_fn.named_parameters()
        self.params = [p for _, p in named]
        # checkpoint names: an ep rank's stacked experts carry their expert range (checkpoint.expert_slice_key)
        ranges = expert_ranges(self.model, named) if mesh.ep > 1 else {}
        self.ckpt_names = {n: expert_slice_key(n, r) for n, r in ranges.items()}
        self.optimizer = build_optimizer(cfg, [(self.ckpt_names.get(n, n), p) for n, p in named], mesh)
        self.scheduler = make_scheduler(self.optimizer, t.steps, cfg.optim.schedule, cfg.optim.warmup_steps,
                                        cfg.optim.min_lr_ratio, cfg.optim.decay_fraction)
        self.sampler = Sampler(self.train_windows, t.seed, t.global_batch_size, mesh.dp_rank, mesh.dp, t.micro_batches)
        self.val_batches = validation_batches(val_windows, t.eval_batches, t.global_batch_size, mesh.dp_rank, mesh.dp,
                                              t.micro_batches)
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = self.model.flops_per_token(t.seq_len)
        self.peak_flops = measure_peak_flops(mesh.device, self.dtype)
        self.step = self._maybe_resume()
        self.metrics = build_metrics(cfg.logging, self.run_dir, mesh.rank, t.steps, self.step, to_container(cfg))
        self.dashboards = Dashboards(cfg, self.run_dir, mesh)
        self.bad_steps = 0                     # non-finite steps in a row
        self.skipped_total = 0
        self.first_bad: tuple[int, str] | None = None  # (step, where) that began the current run of bad steps
        self.last_expert_loads: torch.Tensor | None = None
        self.watchdog: Watchdog | None = None
        self.history: list[dict] = []
        self.stop_requested = False            # SIGTERM seen by this rank
        self.stopping = False                  # some rank saw it: every rank stops after the same step

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model/{self.ckpt_names.get(k, k)}": v for k, v in self.step_fn.state_tensors().items()}
        tensors.update(self.optimizer.sharded_state_dict())
        return tensors

    def _maybe_resume(self) -> int:
        """Load what rank 0 decided (framework/resume.py); rank 0 verified every file's checksum first."""
        folder, meta = self.resume_from.folder, self.resume_from.meta
        if folder is None:
            return 0
        check_data(meta, self.data_identity, self.cfg.train.resume_allow_data_change, folder)
        tensors = {f"model/{self.ckpt_names.get(k, k)}": v for k, v in self.step_fn.state_tensors().items()}
        convert = self.cfg.optim.convert_state
        optim_sd = self.optimizer.sharded_state_dict(like=folder, convert=convert)
        meta = Checkpointer.load(folder, {**tensors, **optim_sd}, verified=meta)
        self.optimizer.load_sharded_state_dict(optim_sd, convert=convert)
        self.sampler.load_state_dict(meta["sampler"])
        self.scheduler.load_state_dict(meta["scheduler"])
        apply_schedule(self.scheduler, self.optimizer, self.cfg.optim.lr, int(meta["step"]))
        for m in self.step_fn.models():       # what the last step's hooks set (the MTP weight's switch)
            m.set_progress(int(meta["step"]) / self.cfg.train.steps)
        rng = torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)
        log.info(f"resumed from {folder} at step {meta['step']}")   # console (rank 0) and every rank's log file
        return int(meta["step"])

    def save_checkpoint(self) -> Path:
        tensors = self._checkpoint_tensors()
        self._check_finite(tensors)
        meta = {"sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state_b64(), "config": redact(to_container(self.cfg)), "world_size": self.mesh.world_size,
                "data_identity": self.data_identity}
        return self.ckpt.save(self.step, tensors, meta)

    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        """A checkpoint never holds NaN or inf: resuming from one would only replay the failure. Collective."""
        bad = [k for k, v in tensors.items() if v.is_floating_point()
               and not bool(torch.isfinite(v if v.element_size() > 1 else v.float()).all())]  # fp8: no isfinite
        if self._sum([float(len(bad))])[0] == 0:
            return
        names = self._gather(bad)
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        raise TrainingAborted(f"step {self.step}: not saving a checkpoint with non-finite values in "
                              f"{', '.join(names[:3])}{more}")

    # -- reductions ----------------------------------------------------------------------------------------------
    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.mesh.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def _gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order."""
        if not self.mesh.distributed:
            return list(items)
        gathered = [None] * self.mesh.world_size
        dist.all_gather_object(gathered, list(items))
        return [x for g in gathered for x in g]

    def _mean_metrics(self, metrics: dict) -> dict:
        """Average each metric over the ranks that reported it (pipeline stages report different keys)."""
        if not self.mesh.distributed:
            return metrics
        gathered = [None] * self.mesh.world_size
        dist.all_gather_object(gathered, metrics)
        keys = sorted({k for m in gathered for k in m})
        return {k: sum(m[k] for m in gathered if k in m) / sum(1 for m in gathered if k in m) for k in keys}

    # -- the loop ------------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation loss, and for MoE models MaxVio_global: expert loads counted over the whole validation set
        (V3 §2.1.2), kept apart from the training step's loads that drive the bias update."""
        models = self.step_fn.models()
        moe = any(m.moe_layers() for m in models)
        for m in models:
            m.eval()
        with contextlib.ExitStack() as stack:   # validation loads are counted apart: the training loads stay
            tallies = [stack.enter_context(m.tally_loads()) for m in models]
            s, n = self.step_fn.evaluate(self.val_batches)
        for m in models:
            m.train()
        s, n = self._sum([s, n])
        out = {"val/loss": s / n}
        if moe:
            loads = sum(t[0] for t in tallies)
            if self.mesh.distributed:
                dist.all_reduce(loads)
            seen = loads.sum(-1) > 0
            if seen.any():
                out["val/maxvio_global"] = max_vio(loads[seen]).mean().item()
        return out

    def _post_step_hooks(self) -> dict:
        """Auxiliary-loss-free balancing: loads summed over every rank's micro-batches, then one bias update."""
        out = {}
        models = self.step_fn.models()
        for m in models:
            m.set_progress(self.step / self.cfg.train.steps)
        models = [m for m in models if m.moe_layers()]
        if not models:
            return out
        loads = sum(m.expert_loads() for m in models)
        if self.mesh.distributed:
            dist.all_reduce(loads)
        for m in models:
            m.update_balance(loads, self.step, self.cfg.train.steps)
        self.last_expert_loads = loads
        vio = max_vio(loads[loads.sum(-1) > 0]) if (loads.sum(-1) > 0).any() else None
        if vio is not None:
            out["moe/maxvio_batch"] = vio.mean().item()
            out.update({f"moe/maxvio_layer{i}": v for i, v in enumerate(vio.tolist())})
        return out

    def train_step(self, micro_batches) -> dict:
        t0 = time.perf_counter()
        n = self.step + 1                      # the step being run, numbered as in the metrics
        self.dashboards.begin_step()
        self._mark("forward_backward")
        result = self.step_fn.forward_backward(micro_batches, trace=self.dashboards.wants_trace(n))
        loss_sum, count, model_metrics = result.loss_sum, result.count, result.metrics
        faults.poison_grads(n, self.step_fn.named_parameters())
        self._mark("all_reduce loss and gradient norm")
        loss_sum, count, stop = self._sum([loss_sum, count, float(self.stop_requested)])
        self.stopping = stop > 0               # agreed with the step's own reduction: no extra collective
        loss = loss_sum / count
        grad_norm = math.sqrt(self._sum([self.step_fn.grad_norm_sq().item()])[0])
        clip = self.cfg.optim.grad_clip
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            if clip > 0 and grad_norm > clip:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(clip / (grad_norm + 1e-6))
            self._mark("optimizer")
            self.optimizer.step()
            self.bad_steps, self.first_bad = 0, None
        else:  # the update would poison the weights: skip it, keep the step count honest
            self._skip_nonfinite(n, loss, grad_norm, micro_batches)
        if self.dashboards.due(n):             # measured while gradients and moments are both allocated
            model_metrics.update(optimizer_bytes(self.optimizer, self.params))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self._mark("balancing and metrics", n)
        extra = self._post_step_hooks()
        dt = time.perf_counter() - t0
        tps = self.tokens_per_step / dt
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt, "tokens_per_s": tps,
               "mfu": self.flops_per_token * tps / (self.peak_flops * self.mesh.world_size),
               "tokens": self.step * self.tokens_per_step, "skipped_steps": float(not finite),
               "skipped_steps_total": float(self.skipped_total)}
        model_metrics.update(self.dashboards.local_scalars(self.step_fn.models()))
        out.update(self._mean_metrics(model_metrics))
        out.update(extra)
        out.update(self.dashboards.memory())
        out.update(self.dashboards.pipeline(result, n, self.metrics))
        self.dashboards.expert_load(self.last_expert_loads, n, self.metrics)
        return out

    # -- non-finite steps ----------------------------------------------------------------------------------------
    def _skip_nonfinite(self, n: int, loss: float, grad_norm: float, micro_batches) -> None:
        self.bad_steps += 1
        self.skipped_total += 1
        if self.first_bad is None:
            self.first_bad = (n, self._locate_nonfinite(loss, micro_batches))
        K = self.cfg.train.max_bad_steps
        if self.mesh.rank == 0:
            log.warning(f"step {n}: loss={loss:.4g} grad_norm={grad_norm:.4g}: non-finite, update skipped "
                        f"({self.bad_steps}/{K} in a row)")
        if self.bad_steps >= K:
            first, where = self.first_bad
            raise TrainingAborted(f"step {n}: loss={loss:.4g} grad_norm={grad_norm:.4g}: non-finite {self.bad_steps} "
                                  f"steps in a row (train.max_bad_steps={K}); first at step {first} in {where}")

    def _locate_nonfinite(self, loss: float, micro_batches) -> str:
        """Where a non-finite step came from, over all ranks: the first module whose forward output is non-finite
        (one process per pipeline, by replaying the step's first micro-batches), else the parameters whose weights or
        gradients are. Parameters are named in model order, so the first one named is the shallowest."""
        named = self.step_fn.named_parameters()
        weights = [n for n, p in named if not bool(torch.isfinite(p.detach()).all())]
        grads = [n for n, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        module = self._first_nonfinite_module(micro_batches) if not math.isfinite(loss) and self.mesh.pp == 1 else None
        tag = f" (rank {self.mesh.rank})" if self.mesh.distributed else ""
        parts = [f"the forward output of module '{module}'{tag}"] if module else []
        parts += [f"weight '{w}'{tag}" for w in weights[:1]]
        more = f" (+{len(grads) - 1} more)" if len(grads) > 1 else ""
        parts += [f"gradient of '{g}'{tag}{more}" for g in grads[:1]]
        found = self._gather(parts[:1])
        return found[0] if found else f"the loss (loss={loss:.4g}; every weight and gradient finite)"

    @torch.no_grad()
    def _first_nonfinite_module(self, micro_batches) -> str | None:
        model = self.step_fn.models()[0]
        found: list[str] = []

        def check(name, module, args, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            bad = (isinstance(o, torch.Tensor) and o.is_floating_point() and not bool(torch.isfinite(o).all())
                   for o in outs)
            if not found and any(bad):
                found.append(name)   # hooks run as modules finish: the innermost, earliest culprit comes first

        handles = [m.register_forward_hook(functools.partial(check, name)) for name, m in model.named_modules() if name]
        try:
            for x, y in micro_batches:   # all of them on every rank: expert-parallel layers exchange tokens
                model.compute_loss(x.to(self.mesh.device), y.to(self.mesh.device))
        finally:
            for h in handles:
                h.remove()
        return found[0] if found else None

    def _mark(self, op: str, step: int | None = None) -> None:
        if self.watchdog is not None:
            self.watchdog.mark(self.step + 1 if step is None else step, op)

    def fit(self) -> list[dict]:
        t = self.cfg.train
        self.watchdog = Watchdog.for_process_group(self.cfg.parallel.timeout_s)
        if self.watchdog is not None:
            self.watchdog.start()
        previous_handler = self._catch_sigterm()
        try:
            if self.step == 0:
                self._mark("evaluate", 0)
                val = self.evaluate()
                self.metrics.log(0, val)
                self.history.append({"step": 0, **val})
            while self.step < t.steps:
                self._mark("data")
                faults.at_step(self.step + 1, self.mesh.rank, self.run_dir)
                out = self.train_step(self.sampler.next_batch())
                if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.steps:
                    self._mark("evaluate", self.step)
                    out.update(self.evaluate())
                self.metrics.log(self.step, out)
                self.history.append({"step": self.step, **out})
                if (t.checkpoint_interval and self.step % t.checkpoint_interval == 0) or self.step == t.steps \
                        or self.stopping:
                    self._mark("checkpoint save", self.step)
                    self.save_checkpoint()
                if self.stopping and self.step < t.steps:
                    log.warning(f"SIGTERM: stopped after step {self.step} with a checkpoint saved; a restart with "
                                f"train.resume=auto continues from it")
                    break
        except Exception as e:
            if self.watchdog is not None and is_comm_failure(e):   # name the rank that left the others waiting
                cause = (str(e).strip().splitlines() or [""])[0][:200]
                raise TrainingAborted(f"{self.watchdog.diagnose()} [{type(e).__name__}: {cause}]",
                                      exit_code=STALL_EXIT) from e
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if self.watchdog is not None:
                self.watchdog.stop()
            self.metrics.close()
            self.release()
        return self.history

    def _catch_sigterm(self):
        """SLURM preemption (and torchrun stopping its workers) sends SIGTERM: finish the step, save, return. The
        flag travels with the step's loss reduction, so every rank stops after the same step."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            if not self.stop_requested:
                log.warning(f"SIGTERM received during step {self.step + 1}: finishing it, then saving a checkpoint")
            self.stop_requested = True

        return signal.signal(signal.SIGTERM, request_stop)
