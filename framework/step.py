"""Step functions: how one rank turns its micro-batches into gradients.

The trainer only talks to this interface, so pipeline schedules plug in without touching the loop:
  named_parameters()              parameters this rank holds and updates (each once)
  state_tensors()                 {fully-qualified name: tensor} of this rank's model state, for checkpoints
  forward_backward(micro_batches) -> (loss_sum, loss_count, metrics): gradients of the mean loss over the GLOBAL
                                  batch are left in .grad, already reduced over every replica that must agree
  evaluate(micro_batches)         -> (loss_sum, loss_count), no gradients
  grad_norm_sq()                  this rank's share of the squared global gradient norm (sum over ranks = total)
  models()                        the model modules on this rank (for balancing and metrics hooks)
LocalStep is the whole model on every rank, data parallel only.
"""
from __future__ import annotations

import torch

from framework.models.layers import causal_lm_loss  # noqa: F401  (re-exported for step implementations)
from parallel.data_parallel import average_gradients
from parallel.mesh import Mesh


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

    def forward_backward(self, micro_batches):
        n = len(micro_batches)
        loss_sum, metrics = 0.0, {}
        for x, y in micro_batches:
            x, y = x.to(self.mesh.device), y.to(self.mesh.device)
            loss, m = self.model.compute_loss(x, y)
            (loss / n).backward()  # mean over micro-batches; replicas are averaged below
            loss_sum += loss.item()
            merge_metrics(metrics, m, 1.0 / n)
        average_gradients(self._params, self.mesh.dp_group)
        return loss_sum, n, metrics

    @torch.no_grad()
    def evaluate(self, micro_batches):
        total = 0.0
        for x, y in micro_batches:
            loss, _ = self.model.compute_loss(x.to(self.mesh.device), y.to(self.mesh.device))
            total += loss.item()
        return total, len(micro_batches)

    def grad_norm_sq(self) -> torch.Tensor:
        # replicas hold identical (averaged) gradients: only data-parallel rank 0 contributes to the global sum
        sq = sum((p.grad.float().pow(2).sum() for p in self._params if p.grad is not None), torch.zeros(()))
        return sq if self.mesh.dp_rank == 0 else torch.zeros(())
