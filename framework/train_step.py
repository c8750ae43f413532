"""Training step functions: how one rank turns its micro-batches into gradients. framework.parallelize builds them.

The trainer only talks to this interface, so pipeline schedules plug in without touching the loop:
  named_parameters()              parameters this rank holds and updates (each once)
  state_tensors()                 {fully-qualified name: tensor} of this rank's model state, for checkpoints
  forward_backward(micro_batches, trace=False) -> StepOutput: gradients of the mean loss over the GLOBAL batch are
                                  left in .grad, already reduced over every replica that must agree; with trace, the
                                  output carries this rank's action timeline (pipelines)
  evaluate(micro_batches)         -> (loss_sum, loss_count), no gradients
  grad_norm_sq()                  this rank's share of the squared global gradient norm (sum over ranks = total)
  models()                        the model modules on this rank (for balancing and metrics hooks)
LocalStep is the whole model on every rank, data parallel only; PipelineStep runs a schedule's action list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from parallel.data_parallel import grad_norm_sq_share, reduce_gradients
from parallel.mesh import Mesh

# (start time, [(start, end, what)]): perf_counter seconds of this rank's actions and waits in one step
Timeline = tuple[float, list[tuple[float, float, str]]]


@dataclass
class StepOutput:
    loss_sum: float                  # sum of the micro-batches' mean losses this rank computed (last stages only)
    count: int                       # how many micro-batches that sum covers
    metrics: dict = field(default_factory=dict)   # what the model reported, mean over those micro-batches
    timeline: Optional[Timeline] = None           # when asked for (trace=True) and the step has one


def merge_metrics(acc: dict, new: dict, weight: float) -> None:
    for k, v in new.items():
        acc[k] = acc.get(k, 0.0) + float(v) * weight


class LocalStep:
    def __init__(self, model: torch.nn.Module, mesh: Mesh):
        self.model, self.mesh = model, mesh
        self._params = [p for p in model.parameters() if p.requires_grad]

    def named_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def models(self) -> list[torch.nn.Module]:
        return [self.model]

    def forward_backward(self, micro_batches, trace: bool = False) -> StepOutput:
        """`trace`: no timeline here (one process runs the whole model in order)."""
        n = len(micro_batches)
        loss_sum, metrics = 0.0, {}
        for x, y in micro_batches:
            x, y = x.to(self.mesh.device), y.to(self.mesh.device)
            loss, m = self.model.compute_loss(x, y)
            (loss / n).backward()  # mean over micro-batches; replicas are averaged below
            loss_sum += loss.item()
            merge_metrics(metrics, m, 1.0 / n)
        reduce_gradients(self.named_parameters(), self.mesh)
        return StepOutput(loss_sum, n, metrics)

    @torch.no_grad()
    def evaluate(self, micro_batches):
        total = 0.0
        for x, y in micro_batches:
            loss, _ = self.model.compute_loss(x.to(self.mesh.device), y.to(self.mesh.device))
            total += loss.item()
        return total, len(micro_batches)

    def grad_norm_sq(self) -> torch.Tensor:
        # each distinct gradient counted by one rank of its replica group (expert shards by their own ep rank)
        return grad_norm_sq_share(self.named_parameters(), self.mesh)


class PipelineStep:
    """This rank's pipeline stages, driven by a schedule's action list through the executor.

    Every rank of a pipeline gets the same micro-batches from the sampler (they share a data-parallel rank) and
    passes the executor only what its stages need: token ids where a first stage is local, (token ids, labels) where
    a last stage is. DualPipe's two copies of each part are summed by `mirror` (schedules.mirror.MirrorExchange),
    then replicas are averaged over the data-parallel group. framework.parallelize.pipeline_step builds it.
    """

    def __init__(self, model: torch.nn.Module, mesh: Mesh, layout, actions: list, stages: dict, executor,
                 micro_batches: int, mirror=None):
        from schedules.verify import microbatches_of

        self.model, self.mesh, self.layout, self.actions = model, mesh, layout, actions
        self.stages, self.executor, self.mirror, self.n = stages, executor, mirror, micro_batches
        self.first_mbs = {mb for s in stages if layout.is_first(s) for mb in microbatches_of(layout, s, self.n)}
        self.last_mbs = {mb for s in stages if layout.is_last(s) for mb in microbatches_of(layout, s, self.n)}
        seen, self._params = set(), []
        for part in self.stages.values():
            for prm in part.parameters():
                if prm.requires_grad and id(prm) not in seen:
                    seen.add(id(prm))
                    self._params.append(prm)
        # the copy that counts in the global gradient norm: direction 0's (DualPipe holds every part twice)
        self._norm_params = [prm for s, part in self.stages.items() if s < self.layout.num_parts
                             for prm in part.parameters() if prm.requires_grad]
        held = {id(t_) for part in self.stages.values() for t_ in part.state_dict(keep_vars=True).values()}
        self._state_names = {n for n, t_ in model.state_dict(keep_vars=True).items() if id(t_) in held}

    def named_parameters(self):
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [(names[id(p)], p) for p in self._params]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.model.state_dict().items() if n in self._state_names}

    def models(self) -> list[torch.nn.Module]:
        return [self.model]

    def _feed(self, micro_batches):
        inputs = {mb: (micro_batches[mb][0].to(self.mesh.device),) for mb in self.first_mbs}
        labels = {mb: (micro_batches[mb][0].to(self.mesh.device), micro_batches[mb][1].to(self.mesh.device))
                  for mb in self.last_mbs}
        return inputs, labels

    def _last_parts(self):
        return [part for s, part in self.stages.items() if self.layout.is_last(s)]

    def forward_backward(self, micro_batches, trace: bool = False) -> StepOutput:
        """`trace`: record the step's action timeline (the dashboards' Gantt chart and measured bubble)."""
        for part in self._last_parts():
            part.metrics.clear()
        inputs, labels = self._feed(micro_batches)
        result = self.executor.run(self.actions, self.n, inputs, labels, train=True, trace=trace,
                                   grads_ready=self.mirror.stage_done if self.mirror else None)
        if self.mirror is not None:
            self.mirror.finish()
        reduce_gradients(self.named_parameters(), self.mesh)
        loss_sum = sum(float(v) for v in result.losses.values()) * self.n   # parts return loss / n
        metrics: dict = {}
        reported = [m for part in self._last_parts() for m in part.metrics]
        for m in reported:
            merge_metrics(metrics, m, 1.0 / len(reported))
        timeline = (result.start_time, [(s, e, str(w)) for s, e, w in result.trace]) if trace else None
        return StepOutput(loss_sum, len(result.losses), metrics, timeline)

    @torch.no_grad()
    def evaluate(self, micro_batches):
        """Forward-only runs of the training schedule, n micro-batches at a time (the last group padded by repeats)."""
        total, count = 0.0, 0
        for start in range(0, len(micro_batches), self.n):
            group = micro_batches[start:start + self.n]
            real = len(group)
            group = group + [group[-1]] * (self.n - real)
            inputs, labels = self._feed(group)
            result = self.executor.run(self.actions, self.n, inputs, labels, train=False)
            for mb, loss in result.losses.items():
                if mb < real:
                    total += float(loss) * self.n
                    count += 1
        return total, count

    def grad_norm_sq(self) -> torch.Tensor:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return grad_norm_sq_share([(names[id(p)], p) for p in self._norm_params], self.mesh)
