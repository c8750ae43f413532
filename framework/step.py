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

import logging

import torch

from parallel.data_parallel import grad_norm_sq_share, reduce_gradients
from parallel.mesh import Mesh

log = logging.getLogger("duet")


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
        reduce_gradients(self.named_parameters(), self.mesh)
        return loss_sum, n, metrics

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
    """This rank's pipeline parts, driven by a schedule's action list through the executor.

    Every rank of a pipeline gets the same micro-batches from the sampler (they share a data-parallel rank) and
    passes the executor only what its stages need: token ids where a first stage is local, (token ids, labels) where
    a last stage is. DualPipe's two copies of each part are summed by schedules.mirror, then replicas are averaged over
    the data-parallel group.
    """

    def __init__(self, model: torch.nn.Module, mesh: Mesh, cfg):
        from schedules import build, check_args, get_layout
        from schedules.executor import PipelineExecutor
        from schedules.stage import split_model
        from schedules.verify import microbatches_of
        from schedules.mirror import build_mirror_exchange, pipelines_of
        from schedules.weight_grad import enable_weight_grad_split, undeferred_weights

        p, t = cfg.parallel, cfg.train
        self.model, self.mesh, self.n = model, mesh, t.micro_batches
        check_args(p.schedule, mesh.pp, self.n)
        self.layout = get_layout(p.schedule, mesh.pp)
        self.actions = build(p.schedule, mesh.pp, self.n)[mesh.pp_rank]
        parts = split_model(model, self.layout.num_parts, p.layers_per_part)
        first_rank = self.layout.stage_to_rank[0]
        last_ranks = {self.layout.stage_to_rank[s] for s in range(self.layout.num_stages) if self.layout.is_last(s)}
        if len(getattr(model, "mtp", ())) and last_ranks != {self.layout.stage_to_rank[s] for s in range(self.layout.num_stages)
                                                          if self.layout.is_first(s)}:
            raise ValueError(f"parallel.schedule={p.schedule}: multi-token prediction needs the embedding on the last "
                             f"stage's rank (use dualpipe or dualpipev, or model.num_nextn_predict_layers=0)")
        self.stages = {s: parts[self.layout.stage_to_part[s]] for s in self.layout.stages_of(mesh.pp_rank)}
        for part in self.stages.values():
            enable_weight_grad_split(part)   # B computes input gradients, W the deferred weight gradients
            part.loss_scale = 1.0 / self.n
            part.overlap = p.overlap         # F&B pairs hide one chunk's all-to-all under the other's compute
            part.recompute = p.recompute     # RMSNorm and SwiGLU outputs recomputed in backward (V3 §3.3)
        # a weight whose layer cannot defer its gradient keeps it in B, which the schedule's bubble does not expect
        stuck = undeferred_weights(model, [m for part in self.stages.values() for m in part.modules()])
        if stuck:
            log.warning(f"weight gradients computed in B, not deferred to W, on pipeline rank {mesh.pp_rank}: "
                        f"{', '.join(stuck)}")
        self.first_mbs = {mb for s in self.stages if self.layout.is_first(s)
                          for mb in microbatches_of(self.layout, s, self.n)}
        self.last_mbs = {mb for s in self.stages if self.layout.is_last(s)
                         for mb in microbatches_of(self.layout, s, self.n)}
        micro = t.global_batch_size // (mesh.dp * self.n)
        dtype = next(model.parameters()).dtype
        # DualPipe: each part's two copies are summed as soon as this rank's copy is final (schedules/mirror.py)
        self.mirror = build_mirror_exchange(self.stages, self.layout, pipelines_of(mesh)) if mesh.distributed else None
        self.executor = PipelineExecutor(self.layout, self.stages, group=mesh.pp_group,
                                         p2p_shapes=[[micro, t.seq_len, model.config.hidden_size]], p2p_dtype=dtype,
                                         device=mesh.device)
        seen, self._params = set(), []
        for part in self.stages.values():
            for prm in part.parameters():
                if prm.requires_grad and id(prm) not in seen:
                    seen.add(id(prm))
                    self._params.append(prm)
        # the copy that counts in the global gradient norm: direction 0's (DualPipe holds every part twice)
        self._norm_params = [prm for s, part in self.stages.items() if s < self.layout.num_parts
                             for prm in part.parameters() if prm.requires_grad]
        names = {id(t_): n for n, t_ in model.state_dict(keep_vars=True).items()}
        held = {id(t_) for part in self.stages.values() for t_ in part.state_dict(keep_vars=True).values()}
        self._state_names = {n for n, t_ in model.state_dict(keep_vars=True).items() if id(t_) in held}
        self._names = names

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

    def forward_backward(self, micro_batches):
        for part in self._last_parts():
            part.metrics.clear()
        inputs, labels = self._feed(micro_batches)
        # the trainer asks for a trace on dashboard steps (pipeline timeline and measured bubble)
        result = self.executor.run(self.actions, self.n, inputs, labels, train=True,
                                   trace=getattr(self, "trace_next", False),
                                   grads_ready=self.mirror.stage_done if self.mirror else None)
        self.last_result = result
        if self.mirror is not None:
            self.mirror.finish()
        reduce_gradients(self.named_parameters(), self.mesh)
        loss_sum = sum(float(v) for v in result.losses.values()) * self.n   # parts return loss / n
        metrics: dict = {}
        reported = [m for part in self._last_parts() for m in part.metrics]
        for m in reported:
            merge_metrics(metrics, m, 1.0 / len(reported))
        return loss_sum, len(result.losses), metrics

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
