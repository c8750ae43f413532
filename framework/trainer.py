"""The step loop, and nothing else: data -> step function -> optimizer -> balancing -> metrics -> checkpoint."""
from __future__ import annotations

import base64
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from framework.checkpoint import Checkpointer
from framework.config import to_container
from framework.data.dataset import Sampler, TokenWindows, validation_batches
from framework.data.prepare import prepare
from framework.metrics import build_metrics
from framework.models import build_model
from framework.optim.lr import make_scheduler
from parallel.mesh import Mesh


class TrainingAborted(RuntimeError):
    pass


def prepare_data(cfg, mesh: Mesh):
    """Rank 0 builds the token cache (if missing) while the others wait, then everyone opens it."""
    d = cfg.data
    args = (d.path, d.cache_dir, d.vocab_size, d.val_fraction, d.max_bytes, d.dtype)
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
    a = torch.randn(n, n, device=device, dtype=dtype)
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


def build_optimizer(cfg, named_params):
    o = cfg.optim
    groups = adamw_param_groups(named_params, o.weight_decay)
    if o.state.exp_avg == "fp32" and o.state.exp_avg_sq == "fp32" and not o.zero:
        opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
        for g in opt.param_groups:  # eager state, so a resume can load into it before the first step
            for p in g["params"]:
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return opt
    from framework.optim.manager import OptimizerStateManager  # compact states / ZeRO-1

    return OptimizerStateManager(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 exp_avg=o.state.exp_avg, exp_avg_sq=o.state.exp_avg_sq)


def optimizer_tensors(opt, names: dict) -> dict[str, torch.Tensor]:
    if hasattr(opt, "sharded_state_dict"):
        return opt.sharded_state_dict()
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"optim/{names[p]}/{k}"] = v
    return out


def _rng_state_b64() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


class Trainer:
    def __init__(self, cfg, mesh: Mesh, step_factory=None):
        self.cfg, self.mesh = cfg, mesh
        t = cfg.train
        torch.manual_seed(t.seed)
        self.run_dir = Path(t.output_dir)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16_emulated": torch.float32}[t.dtype]

        prepared = prepare_data(cfg, mesh)
        self.train_windows = TokenWindows(prepared.train_bin, prepared.dtype, t.seq_len)
        val_windows = TokenWindows(prepared.val_bin, prepared.dtype, t.seq_len)

        model_cfg = OmegaConf.to_object(cfg.model)
        self.model = build_model(model_cfg).to(device=mesh.device, dtype=self.dtype)
        if mesh.ep > 1:  # keep this rank's experts, exchange tokens with all-to-all (same init on every rank)
            from parallel.expert import apply_expert_parallel
            apply_expert_parallel(self.model, mesh, cfg)
        if cfg.fp8.enabled:
            from framework.fp8 import convert_to_fp8
            convert_to_fp8(self.model, exclude=list(cfg.fp8.exclude), backend=cfg.fp8.backend, pow2=cfg.fp8.pow2_scales)
        elif t.dtype == "bf16_emulated":
            from framework.fp8.emulate import convert_to_bf16_emulation
            convert_to_bf16_emulation(self.model, exclude=list(cfg.fp8.exclude))
        if step_factory is None:
            from framework.step import LocalStep
            step_factory = LocalStep
        self.step_fn = step_factory(self.model, mesh) if cfg.parallel.pp == 1 else step_factory(self.model, mesh, cfg)
        named = self.step_fn.named_parameters()
        self.param_names = {p: n for n, p in named}
        self.params = [p for _, p in named]
        self.optimizer = build_optimizer(cfg, named)
        self.scheduler = make_scheduler(self.optimizer, t.steps, cfg.optim.schedule, cfg.optim.warmup_steps,
                                        cfg.optim.min_lr_ratio, cfg.optim.decay_fraction)
        micro = t.global_batch_size // (mesh.dp * t.micro_batches)
        self.sampler = Sampler(self.train_windows, t.seed, t.global_batch_size, mesh.dp_rank, mesh.dp, t.micro_batches)
        self.val_batches = validation_batches(val_windows, t.eval_batches, micro)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", t.keep_checkpoints)
        self.step = self._maybe_resume()
        self.tokens_per_step = t.global_batch_size * t.seq_len
        self.flops_per_token = self.model.flops_per_token(t.seq_len)
        self.peak_flops = measure_peak_flops(mesh.device, self.dtype)
        self.metrics = build_metrics(cfg.logging, self.run_dir, mesh.rank, t.steps, self.step, to_container(cfg))
        self.bad_steps = 0
        self.history: list[dict] = []

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model/{k}": v for k, v in self.step_fn.state_tensors().items()}
        tensors.update(optimizer_tensors(self.optimizer, self.param_names))
        return tensors

    def _maybe_resume(self) -> int:
        r = self.cfg.train.resume
        folder = None
        if r == "auto":
            folder = self.ckpt.latest()
        elif r != "none":
            folder = Path(r)
        if folder is None:
            return 0
        meta = Checkpointer.load(folder, self._checkpoint_tensors())
        self.sampler.load_state_dict(meta["sampler"])
        self.scheduler.load_state_dict(meta["scheduler"])
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr
        rng = torch.frombuffer(bytearray(base64.b64decode(meta["rng"])), dtype=torch.uint8)
        torch.set_rng_state(rng)
        if self.mesh.rank == 0:
            print(f"resumed from {folder} at step {meta['step']}", flush=True)
        return int(meta["step"])

    def save_checkpoint(self) -> Path:
        meta = {"sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state_b64(), "config": to_container(self.cfg), "world_size": self.mesh.world_size}
        return self.ckpt.save(self.step, self._checkpoint_tensors(), meta)

    # -- reductions ----------------------------------------------------------------------------------------------
    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.mesh.distributed:
            dist.all_reduce(t)
        return t.tolist()

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
        moe = self.cfg.model.name == "deepseek_v3"
        if moe:
            from framework.models.deepseek_v3 import balance
            train_loads = [balance.expert_loads(m).clone() for m in models]
            for m in models:
                balance.reset_loads(m)
        for m in models:
            m.eval()
        s, n = self.step_fn.evaluate(self.val_batches)
        for m in models:
            m.train()
        s, n = self._sum([s, n])
        out = {"val/loss": s / n}
        if moe:
            loads = sum(balance.expert_loads(m) for m in models)
            if self.mesh.distributed:
                dist.all_reduce(loads)
            seen = loads.sum(-1) > 0
            if seen.any():
                out["val/maxvio_global"] = balance.max_vio(loads[seen]).mean().item()
            for m, saved in zip(models, train_loads):
                for r, row in zip(balance.routers(m), saved):
                    r.load.copy_(row)
        return out

    def _post_step_hooks(self) -> dict:
        """Auxiliary-loss-free balancing: loads summed over every rank's micro-batches, then one bias update."""
        out = {}
        for m in self.step_fn.models():
            if hasattr(m, "set_progress"):
                m.set_progress(self.step / self.cfg.train.steps)
        if self.cfg.model.name != "deepseek_v3":
            return out
        from framework.models.deepseek_v3 import balance

        models = self.step_fn.models()
        loads = sum(balance.expert_loads(m) for m in models)
        if self.mesh.distributed:
            dist.all_reduce(loads)
        mc = self.cfg.model
        rate = mc.bias_update_rate if self.step < mc.bias_update_stop_fraction * self.cfg.train.steps else 0.0
        for m in models:
            balance.update_biases(m, loads, rate)
            balance.reset_loads(m)
        vio = balance.max_vio(loads[loads.sum(-1) > 0]) if (loads.sum(-1) > 0).any() else None
        if vio is not None:
            out["moe/maxvio_batch"] = vio.mean().item()
            out.update({f"moe/maxvio_layer{i}": v for i, v in enumerate(vio.tolist())})
        return out

    def train_step(self, micro_batches) -> dict:
        t0 = time.perf_counter()
        loss_sum, count, model_metrics = self.step_fn.forward_backward(micro_batches)
        loss_sum, count = self._sum([loss_sum, count])
        loss = loss_sum / count
        grad_norm = math.sqrt(self._sum([self.step_fn.grad_norm_sq().item()])[0])
        clip = self.cfg.optim.grad_clip
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            if clip > 0 and grad_norm > clip:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(clip / (grad_norm + 1e-6))
            self.optimizer.step()
            self.bad_steps = 0
        else:  # the update would poison the weights: skip it, keep the step count honest
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise TrainingAborted(f"step {self.step}: loss={loss} grad_norm={grad_norm}: non-finite "
                                      f"{self.bad_steps} steps in a row (train.max_bad_steps)")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        extra = self._post_step_hooks()
        dt = time.perf_counter() - t0
        tps = self.tokens_per_step / dt
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": dt, "tokens_per_s": tps,
               "mfu": self.flops_per_token * tps / (self.peak_flops * self.mesh.world_size),
               "tokens": self.step * self.tokens_per_step, "skipped_steps": float(not finite)}
        out.update(self._mean_metrics(model_metrics))
        out.update(extra)
        return out

    def fit(self) -> list[dict]:
        t = self.cfg.train
        try:
            if self.step == 0:
                val = self.evaluate()
                self.metrics.log(0, val)
                self.history.append({"step": 0, **val})
            while self.step < t.steps:
                out = self.train_step(self.sampler.next_batch())
                if (t.eval_interval and self.step % t.eval_interval == 0) or self.step == t.steps:
                    out.update(self.evaluate())
                self.metrics.log(self.step, out)
                self.history.append({"step": self.step, **out})
                if (t.checkpoint_interval and self.step % t.checkpoint_interval == 0) or self.step == t.steps:
                    self.save_checkpoint()
        finally:
            self.metrics.close()
        return self.history
