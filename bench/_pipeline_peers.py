"""The peers of bench/pipeline.py: torch.distributed.pipelining and DeepSpeed's pipeline engines, traced alike.

Each builder returns a contender: an object with `name`, `framework` and `step() -> (loss_sum, loss_count)`, which
after every step leaves in `spans` the (start, end, label) of each computation it ran on this rank (time.time()
seconds) and in `opt_s` the seconds its optimizer step took. The peers have no trace of their own, so their
computations are timed by wrapping the methods that run one chunk:
  torch.distributed.pipelining  PipelineStage.forward_one_chunk / backward_one_chunk / backward_weight_one_chunk
  DeepSpeed                     the engine's ForwardPass / BackwardPass / OptimizerStep instructions
Communication, waits and bookkeeping stay outside the spans, as in our executor's trace.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class Timed:
    """Spans, optimizer and gradient-exchange time of one step; the contender clears them at each step start."""

    def __init__(self):
        self.spans: list[tuple[float, float, str]] = []
        self.opt_s = 0.0
        self.sync_s = 0.0     # gradient exchange after the pipeline (DualPipe's two copies); none for the peers here

    def clear(self) -> None:
        self.spans, self.opt_s, self.sync_s = [], 0.0, 0.0


def _sequential(blocks: list[nn.Module], start: int, stop: int) -> nn.Sequential:
    return nn.Sequential(*(copy.deepcopy(b) for b in blocks[start:stop]))


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer every contender of a run uses: "adamw" (bench.pipeline) or "sgd" (bench.dropin)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer={kind!r}: allowed ['adamw', 'sgd']")


def _timed_optimizer_step(opt: torch.optim.Optimizer, timed: Timed) -> None:
    t = time.time()
    opt.step()
    opt.zero_grad(set_to_none=True)
    timed.opt_s += time.time() - t


# ---------------------------------------------------------------- torch.distributed.pipelining
class TorchPipelining(Timed):
    """Schedule1F1B (1 stage per rank) or ScheduleDualPipeV (2 stages per rank, V layout) on the default group."""

    def __init__(self, schedule: str, blocks: list[nn.Module], micro_batches: list, lr: float,
                 optimizer: str = "adamw"):
        super().__init__()
        import torch.distributed as dist
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

        self.framework = "torch.distributed.pipelining"
        self.rank, pp = dist.get_rank(), dist.get_world_size()
        n = len(micro_batches)
        # whole-batch tensors: the schedule cuts them back into the same n micro-batches along dim 0
        self.x = torch.cat([x for x, _ in micro_batches])            # [n*b, s, D]
        self.y = torch.cat([y for _, y in micro_batches])
        if schedule == "1f1b":
            self.name = "torch Schedule1F1B"
            per = len(blocks) // pp
            stage_ids = [self.rank]
            parts = {self.rank: _sequential(blocks, self.rank * per, (self.rank + 1) * per)}
            num_stages = pp
        elif schedule == "dualpipev":
            self.name = "torch ScheduleDualPipeV"
            num_stages = 2 * pp
            per = len(blocks) // num_stages
            stage_ids = [self.rank, num_stages - 1 - self.rank]          # the V: down on r, back on 2pp-1-r
            parts = {s: _sequential(blocks, s * per, (s + 1) * per) for s in stage_ids}
        else:
            raise ValueError(f"schedule={schedule!r}: allowed ['1f1b', 'dualpipev']")
        self.stages = []
        for s in stage_ids:
            stage = PipelineStage(parts[s], s, num_stages, torch.device("cpu"))
            self._trace(stage, s)
            self.stages.append(stage)
        self.first = 0 in stage_ids
        self.last = num_stages - 1 in stage_ids
        if schedule == "1f1b":
            self.schedule = Schedule1F1B(self.stages[0], n_microbatches=n, loss_fn=F.mse_loss)
        else:
            self.schedule = ScheduleDualPipeV(self.stages, n_microbatches=n, loss_fn=F.mse_loss)
        # scale_grads=True (default) divides gradients by n: the gradient of the mean micro-batch loss, as ours
        self.opt = make_optimizer(optimizer, [p for m in parts.values() for p in m.parameters()], lr)

    def _trace(self, stage, stage_id: int) -> None:
        spans = self  # read self.spans at call time: clear() replaces the list

        def wrap(fn: Callable, kind: Callable[[dict], str]):
            def run(chunk_id, *args, **kwargs):
                t = time.time()
                out = fn(chunk_id, *args, **kwargs)
                spans.spans.append((t, time.time(), f"{kind(kwargs)}{stage_id}.{chunk_id}"))
                return out
            return run

        stage.forward_one_chunk = wrap(stage.forward_one_chunk, lambda kw: "F")
        stage.backward_one_chunk = wrap(stage.backward_one_chunk,
                                        lambda kw: "BW" if kw.get("full_backward", True) else "B")
        stage.backward_weight_one_chunk = wrap(stage.backward_weight_one_chunk, lambda kw: "W")

    def step(self) -> tuple[float, int]:
        self.clear()
        kwargs, losses = {}, []
        if self.last:
            kwargs.update(target=self.y, losses=losses)
        args = (self.x,) if self.first else ()
        self.schedule.step(*args, return_outputs=False, **kwargs)
        _timed_optimizer_step(self.opt, self)
        return float(sum(float(v.detach()) for v in losses)), len(losses)


# ---------------------------------------------------------------- DeepSpeed
def _deepspeed_config(n: int, micro_batch: int, lr: float, optimizer: str) -> dict:
    config = {
        "train_batch_size": n * micro_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": n,
        # torch's AdamW: DeepSpeed's FusedAdam would JIT-build a C++ extension, minutes on 2 cores
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,      # True crashes DeepSpeed 0.19's pipe engine on CPU
    }
    if optimizer != "adamw":   # another optimizer is handed to deepspeed.initialize as a client optimizer
        del config["optimizer"]
    return config


class DeepSpeedPipe(Timed):
    """deepspeed.pipe.PipelineModule (1F1B TrainSchedule) or DualPipeVModule over the same blocks."""

    def __init__(self, schedule: str, blocks: list[nn.Module], micro_batches: list, lr: float,
                 optimizer: str = "adamw"):
        super().__init__()
        import deepspeed
        import torch.distributed as dist
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe import schedule as ds_schedule

        deepspeed.utils.logger.setLevel(logging.WARNING)
        self.framework = "DeepSpeed " + deepspeed.__version__
        deepspeed.init_distributed(dist_backend="gloo")                # reuses the initialized default group
        pp = dist.get_world_size()
        layers = [copy.deepcopy(b) for b in blocks]                     # each rank keeps only its own stages
        if schedule == "1f1b":
            self.name, cls = "DeepSpeed PipelineModule (1F1B)", PipelineModule
            self.loss_rank = pp - 1
        elif schedule == "dualpipev":
            from deepspeed.pipe import DualPipeVModule

            self.name, cls = "DeepSpeed DualPipeVModule", DualPipeVModule
            self.loss_rank = 0                                          # the V ends where it starts
        else:
            raise ValueError(f"schedule={schedule!r}: allowed ['1f1b', 'dualpipev']")
        n, micro_batch = len(micro_batches), micro_batches[0][0].shape[0]
        with contextlib.redirect_stdout(io.StringIO()):                 # its partition printout
            # "uniform": equal layer counts, L/2 per stage (DualPipeVModule: 2*pp stages of L/4)
            module = cls(layers=layers, num_stages=pp, loss_fn=F.mse_loss, partition_method="uniform")
            client = None if optimizer == "adamw" else make_optimizer(optimizer, module.parameters(), lr)
            self.engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                                        optimizer=client,
                                                        config=_deepspeed_config(n, micro_batch, lr, optimizer))
        torch.set_num_threads(1)   # in case the engine's accelerator set its own thread count
        self.micro_batches = micro_batches
        self.rank = dist.get_rank()
        self._trace(ds_schedule)

    def _trace(self, ds_schedule) -> None:
        timed = self
        table = dict(type(self.engine)._INSTRUCTION_MAP)

        def wrap(fn: Callable, kind: str):
            def run(engine, **kwargs):
                t = time.time()
                fn(engine, **kwargs)
                label = f"{kind}{kwargs.get('phase', '')}.{kwargs.get('buffer_id', '')}"
                timed.spans.append((t, time.time(), label))
            return run

        def optimizer(fn: Callable):
            def run(engine, **kwargs):
                t = time.time()
                fn(engine, **kwargs)
                timed.opt_s += time.time() - t
            return run

        table[ds_schedule.ForwardPass] = wrap(table[ds_schedule.ForwardPass], "F")
        table[ds_schedule.BackwardPass] = wrap(table[ds_schedule.BackwardPass], "BW")   # no W split in DeepSpeed
        table[ds_schedule.OptimizerStep] = optimizer(table[ds_schedule.OptimizerStep])
        self.engine._INSTRUCTION_MAP = table     # _exec_schedule looks the map up on the instance

    def step(self) -> tuple[float, int]:
        self.clear()
        loss = self.engine.train_batch(iter(self.micro_batches))      # mean micro-batch loss, on every rank
        if self.rank != self.loss_rank:
            return 0.0, 0
        return float(loss) * len(self.micro_batches), len(self.micro_batches)


PEERS = [("torch", "1f1b"), ("torch", "dualpipev"), ("deepspeed", "1f1b"), ("deepspeed", "dualpipev")]
PEER_NAMES = {("torch", "1f1b"): "torch Schedule1F1B", ("torch", "dualpipev"): "torch ScheduleDualPipeV",
              ("deepspeed", "1f1b"): "DeepSpeed PipelineModule (1F1B)",
              ("deepspeed", "dualpipev"): "DeepSpeed DualPipeVModule"}


def build_peer(framework: str, schedule: str, blocks: list[nn.Module], micro_batches: list, lr: float,
               optimizer: str = "adamw"):
    cls = {"torch": TorchPipelining, "deepspeed": DeepSpeedPipe}[framework]
    return cls(schedule, blocks, micro_batches, lr, optimizer)
