"""OptimizerStateManager: AdamW with fp32 | bf16 | fp8 moments, FP32 master weights and ZeRO-1, as a torch Optimizer.

What a step does, per bucket of parameters (zero.py draws the layout):
    gradient  param.grad (any dtype) -> fp32, averaged over the data-parallel group by a reduce-scatter (ZeRO-1)
    weights   the fp32 master shard when params are not fp32 (V3 §3.3.3: FP32 master weights), else the params
    moments   loaded into fp32 from their storage (state_format.py), updated, stored back (re-quantized)
    update    exactly torch.optim.AdamW(foreach=False): p *= 1 - lr*wd; m.lerp_(g, 1-b1); v = b2*v + (1-b2)*g*g;
              p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps), in torch's operation order, so that fp32 states
              on fp32 params give bit-identical results (tests/framework/optim/test_manager.py checks torch.equal)
    write     master -> working params (rounded to their dtype); all-gathered from the shards under ZeRO-1

Bytes per parameter (memory_report(), measured from the allocated tensors; moments incl. fp8 scales):
    moments fp32 8, bf16 4, fp8 2 + 8/block = 2.0625 at block 128; master 4 when params are bf16;
    ZeRO-1 divides master and moments by the data-parallel size. Tensors under `small_tensor_threshold` elements
    (norms, biases) and those matched by `keep_fp32` keep fp32 moments whatever the format.
    Compare V3 §3.3.3 (4 master + 4 gradient + 2 + 2 bytes with bf16 moments), torchao's fp8 AdamW (about 2.03 B
    per moment value) and COAT (about 2.09).

How far bf16 and fp8 moments move the update and the loss from fp32 states, and what each costs in step time, is
measured by bench/optim_state.py and bench/optim_loss.py (docs/BENCHMARKS.md); state_format.py says how the fp8
second moment is stored and docs/OPTIMIZER_STATE.md why.

Behaviours to know:
- A parameter whose .grad is None steps with a zero gradient (its moments decay, weight decay applies): the right
  thing for an expert that received no tokens; torch.optim.AdamW would skip it instead.
- Non-finite gradients are not filtered here: an inf or NaN reaches the moments and the weights. The trainer skips
  the step when the loss or the gradient norm is not finite (trainer.py); call step() only on finite gradients.
- With a dp_group of size > 1 and average_grads=True (the default), step() reduces the gradients itself: pass each
  rank's LOCAL gradients (do not all-reduce them first). Expert parameters (param._duet_expert = True, or the
  is_expert predicate) are reduced and sharded over expert_dp_group, the ranks that replicate the same experts.
  A trainer that needs the reduced gradient before the step (global-norm clipping, the finite check) reduces it
  itself and passes average_grads=False: ZeRO-1 then only shards the state, at the cost of an all-reduce (a
  reduce-scatter plus an all-gather) where a reduce-scatter would do.

Checkpoints: sharded_state_dict() -> {key: tensor} for torch.distributed.checkpoint, keyed by parameter NAME with
the full logical state of each parameter, in its stored format (no dequantization, so save -> load is exact):
    optim/step                        int64 []
    optim/{name}/master               fp32, param shape (only with master weights)
    optim/{name}/exp_avg.fp32|bf16    param shape
    optim/{name}/exp_avg.fp8          float8_e4m3fn [ceil(numel / block) * block]  (padded to whole blocks)
    optim/{name}/exp_avg.fp8_scale    fp32 [ceil(numel / block)]
    and the same for exp_avg_sq (its fp8 codes hold sqrt(v)).
No shape depends on the data-parallel size, so a checkpoint saved at dp=2 loads at dp=1 or dp=4. Under ZeRO-1 the
shards are all-gathered first (each rank holds the full state of its parameters while saving; DCP writes each key
once); without sharding the tensors ARE the live state (no copy; loading in place restores it).
The format is in the key, so loading into a manager of another format fails loudly instead of casting raw codes:
    sd = opt.sharded_state_dict(like=checkpoint_dir)   # empty tensors laid out like the checkpoint
    framework.checkpoint.load_tensors(checkpoint_dir, sd)   # or dcp.load for a folder you wrote yourself
    opt.load_sharded_state_dict(sd, convert=False)     # ValueError naming both formats unless convert=True
"""
from __future__ import annotations

import fnmatch
import os
from typing import Callable, Iterable

import torch

from framework.optim.state_format import FORMATS, MomentBuffer, check_format, decode
from framework.optim.zero import (BucketLayout, all_gather_shards, flatten_into, group_rank, group_size,
                                  reduce_scatter_sum)

def adamw_(w, g, exp_avg, exp_avg_sq, *, step: int, lr: float, beta1: float, beta2: float, eps: float,
           weight_decay: float) -> None:
    """One AdamW update of fp32 tensors in place, in the operation order of torch.optim.AdamW(foreach=False)."""
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)                          # decoupled weight decay
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-step_size)


class _Bucket:
    """Parameters of one param group that share dtype, moment formats, master-weight choice and process group."""

    def __init__(self, params, names, group_index, formats, block, master, group, expert):
        self.params, self.names, self.group_index, self.group, self.expert = params, names, group_index, group, expert
        self.dtype = params[0].dtype
        align = block if "fp8" in formats else 1   # fp8 blocks never straddle two parameters
        self.layout = BucketLayout.build([p.numel() for p in params], align, group_size(group), group_rank(group))
        n = self.layout.shard_numel
        device = params[0].device
        self.exp_avg = MomentBuffer(n, formats[0], block, device=device)
        self.exp_avg_sq = MomentBuffer(n, formats[1], block, sqrt=True, device=device)
        self.master = self.my_shard([p.detach() for p in params]) if master else None     # fp32 [shard]

    def moments(self):
        return (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq))

    def my_shard(self, tensors) -> torch.Tensor:
        """This rank's shard of the bucket's tensors (one per param, None = zeros), in fp32 [shard_numel]."""
        out = torch.zeros(self.layout.shard_numel, device=self.params[0].device)
        for i, lo, hi, at in self.layout.pieces():
            hi = min(hi, self.layout.numels[i])
            if lo < hi and tensors[i] is not None:
                out[at:at + hi - lo].copy_(tensors[i].reshape(-1)[lo:hi])
        return out

    def grad_shard(self, average: bool, divisor: int) -> torch.Tensor:
        """This rank's shard of the gradient, fp32 [shard_numel]: (sum over the group of the local .grad) / divisor
        by a reduce-scatter, or (average=False) cut from a .grad that is already reduced."""
        if not average:
            return self.my_shard([p.grad for p in self.params])
        flat = torch.zeros(self.layout.total, device=self.params[0].device)
        flatten_into(flat, [p.grad for p in self.params], self.layout)
        return reduce_scatter_sum(flat, self.layout, self.group).div_(divisor)

    def write_weights(self, w: torch.Tensor) -> None:
        """Updated fp32 shard -> every replica's working params (rounded to their dtype)."""
        full = w if self.layout.world == 1 else all_gather_shards(w.to(self.dtype), self.layout, self.group)
        for p, off, n in zip(self.params, self.layout.offsets, self.layout.numels):
            p.detach().copy_(full[off:off + n].view(p.shape))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_shards(t, self.layout, self.group)


def _key(prefix: str, name: str, kind: str, fmt: str) -> str:
    return f"{prefix}{name}/{kind}.{fmt}"


def _fmt_base(fmt_name: str) -> str:
    return fmt_name.split("/")[0]


class OptimizerStateManager(torch.optim.Optimizer):
    """AdamW over `params` (tensors, (name, tensor) pairs or param-group dicts) with compact moments.

    exp_avg / exp_avg_sq: 'fp32' | 'bf16' | 'fp8' (block-scaled E4M3, `block` values per fp32 scale).
    small_tensor_threshold: tensors with fewer elements keep fp32 moments.
    keep_fp32: a predicate (name, param) -> bool, or fnmatch patterns on names, for more fp32-moment tensors.
    master_weights: None = an fp32 master copy for every param that is not fp32; True = for all; False = none
        (non-fp32 params are then updated in fp32 and rounded back each step).
    dp_group: ZeRO-1 over this group when its size > 1.
    expert_dp_group / is_expert: expert params (default: param._duet_expert) are reduced and sharded over
        expert_dp_group instead, the ranks holding replicas of the same experts (size 1 when ep == dp); required
        when dp_group has size > 1 and expert params exist.
    average_grads: True = step() reduces the LOCAL .grad itself: sum over the param's group (reduce-scatter under
        ZeRO-1) divided by grad_divisor (default: the dp_group size; right for dense params, and for expert params
        whose .grad already sums their expert-parallel peers' tokens, as the all-to-all backward delivers it:
        parallel/data_parallel.py). False = .grad is already reduced (the caller clipped or checked it first);
        each rank just takes its shard.
    names: {param: name}, for reports and checkpoint keys (default: the names of (name, param) pairs, else
        'group{g}.{i}'). Names must be unique, also across pipeline and expert-parallel ranks (DCP keys).
    bucket_numel: most elements per flat bucket (bounds the temporary buffers of a step).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1, *,
                 exp_avg: str = "fp32", exp_avg_sq: str = "fp32", block: int = 128,
                 small_tensor_threshold: int = 4096, keep_fp32: Callable | Iterable[str] = (),
                 master_weights: bool | None = None, dp_group=None, expert_dp_group=None,
                 is_expert: Callable | None = None, average_grads: bool = True, grad_divisor: int | None = None,
                 names: dict | None = None, bucket_numel: int = 1 << 26):
        check_format("exp_avg", exp_avg)
        check_format("exp_avg_sq", exp_avg_sq)
        if not isinstance(block, int) or block <= 0:
            raise ValueError(f"block={block!r}: must be a positive int (128 or 256 are usual)")
        if not isinstance(small_tensor_threshold, int) or small_tensor_threshold < 0:
            raise ValueError(f"small_tensor_threshold={small_tensor_threshold!r}: must be an int >= 0")
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights={master_weights!r}: allowed None (auto), True, False")
        if not isinstance(bucket_numel, int) or bucket_numel <= 0:
            raise ValueError(f"bucket_numel={bucket_numel!r}: must be a positive int")
        if grad_divisor is not None and (not isinstance(grad_divisor, int) or grad_divisor <= 0):
            raise ValueError(f"grad_divisor={grad_divisor!r}: must be a positive int or None (the dp_group size)")
        if names is not None and not isinstance(names, dict):
            raise ValueError(f"names={type(names).__name__}: must be a dict {{param: name}}")
        if isinstance(keep_fp32, str):
            keep_fp32 = (keep_fp32,)
        if not callable(keep_fp32):
            patterns = tuple(keep_fp32)
            if not all(isinstance(s, str) for s in patterns):
                raise ValueError(f"keep_fp32={keep_fp32!r}: a predicate (name, param) -> bool or name patterns")
            keep_fp32 = lambda name, p: any(fnmatch.fnmatchcase(name, pat) for pat in patterns)  # noqa: E731
            self._keep_patterns = patterns
        else:
            self._keep_patterns = None
        self.formats = (exp_avg, exp_avg_sq)
        self.block, self.small_tensor_threshold, self.master_weights = block, small_tensor_threshold, master_weights
        self.dp_group, self.expert_dp_group = dp_group, expert_dp_group
        self.is_expert = is_expert or (lambda p: bool(getattr(p, "_duet_expert", False)))
        self.average_grads = bool(average_grads)
        self.grad_divisor = grad_divisor or group_size(dp_group)
        self.bucket_numel, self._keep_fp32, self._names_arg = bucket_numel, keep_fp32, names or {}
        self._buckets: list[_Bucket] = []
        self._names: dict[torch.Tensor, str] = {}
        self._used_names: set[str] = set()
        self._step_t = torch.zeros((), dtype=torch.int64)   # optimizer steps taken (a tensor: checkpointed in place)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._ready = True
        for gi in range(len(self.param_groups)):
            self._build_buckets(gi)

    # -- construction ---------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            self._build_buckets(len(self.param_groups) - 1)

    @staticmethod
    def _check_hyper(gi: int, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not float(lr) >= 0:
            raise ValueError(f"lr={lr!r} (param group {gi}): must be >= 0")
        for arg, b in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0 <= b < 1:
                raise ValueError(f"{arg}={b!r} (param group {gi}): must be in [0, 1)")
        if not eps >= 0:
            raise ValueError(f"eps={eps!r} (param group {gi}): must be >= 0")
        if not wd >= 0:
            raise ValueError(f"weight_decay={wd!r} (param group {gi}): must be >= 0")

    def _build_buckets(self, gi: int) -> None:
        group = self.param_groups[gi]
        self._check_hyper(gi, group)
        given = group.get("param_names")
        keyed: dict[tuple, list] = {}
        for i, p in enumerate(group["params"]):
            name = self._names_arg.get(p) or (given[i] if given else None)
            if name is None:
                if self._keep_patterns:
                    raise ValueError("keep_fp32 is a list of name patterns but params have no names: "
                                     "pass names={param: name} or (name, param) pairs")
                name = f"group{gi}.{i}"
            if name in self._used_names:
                raise ValueError(f"names: {name!r} is used by two parameters; checkpoint keys need unique names")
            self._names[p] = name
            self._used_names.add(name)
            small = p.numel() < self.small_tensor_threshold or self._keep_fp32(name, p)
            formats = ("fp32", "fp32") if small else self.formats
            master = (p.dtype != torch.float32) if self.master_weights is None else self.master_weights
            expert = self.is_expert(p)
            keyed.setdefault((expert, formats, p.dtype, master, p.device), []).append((name, p))
        for (expert, formats, _, master, _), members in sorted(keyed.items(), key=lambda kv: kv[0][0]):
            pg = self.expert_dp_group if expert else self.dp_group
            if expert and group_size(self.dp_group) > 1 and self.expert_dp_group is None:
                raise ValueError(f"expert_dp_group=None but {members[0][0]!r} is an expert parameter and dp_group "
                                 f"has {group_size(self.dp_group)} ranks: pass the group of ranks that replicate "
                                 f"each expert (a group of size 1 when every expert lives on one rank)")
            chunk, size = [], 0
            for name, p in members + [(None, None)]:
                if p is None or (chunk and size + p.numel() > self.bucket_numel):
                    if chunk:
                        self._buckets.append(_Bucket([q for _, q in chunk], [n for n, _ in chunk], gi, formats,
                                                     self.block, master, pg, expert))
                    chunk, size = [], 0
                if p is not None:
                    chunk.append((name, p))
                    size += p.numel()
        # every rank visits dense buckets first, then expert ones: collectives line up within each group
        self._buckets.sort(key=lambda b: b.expert)

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_t += 1
        step = int(self._step_t)
        divisor = self.grad_divisor if self.average_grads else 1
        for b in self._buckets:
            group = self.param_groups[b.group_index]
            beta1, beta2 = group["betas"]
            hyper = dict(step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            exp_avg, exp_avg_sq = b.exp_avg.load(), b.exp_avg_sq.load()          # fp32 [shard]
            if b.layout.world > 1:   # ZeRO-1: my shard of the averaged gradient, then all-gather the weights
                weights = b.master if b.master is not None else b.my_shard([p.detach() for p in b.params])
                adamw_(weights, b.grad_shard(self.average_grads, divisor), exp_avg, exp_avg_sq, **hyper)
                b.write_weights(weights)
            else:                    # one replica: update each parameter where it lies, no flat copies
                for p, off, n in zip(b.params, b.layout.offsets, b.layout.numels):
                    grad = p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(n, device=p.device)
                    if divisor != 1:
                        grad = grad / divisor    # e.g. experts that live on one rank (ep == dp)
                    weights = b.master[off:off + n] if b.master is not None else p.detach().reshape(-1)
                    adamw_(weights, grad, exp_avg[off:off + n], exp_avg_sq[off:off + n], **hyper)
                    if b.master is not None or weights.data_ptr() != p.data_ptr():   # (a non-contiguous p)
                        p.detach().copy_(weights.view(p.shape))
            b.exp_avg.store_(exp_avg)
            b.exp_avg_sq.store_(exp_avg_sq)
        return loss

    @property
    def step_count(self) -> int:
        return int(self._step_t)

    # -- reports --------------------------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes per parameter of this rank, from the tensors allocated now: working weights, master, grads
        (param.grad as it is), exp_avg, exp_avg_sq (fp8 scales included), moments, total; and num_params."""
        params = [p for b in self._buckets for p in b.params]
        n = sum(p.numel() for p in params)
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        nbytes = {
            "weights": sum(size(p) for p in params),
            "master": sum(size(b.master) for b in self._buckets if b.master is not None),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "exp_avg": sum(b.exp_avg.nbytes() for b in self._buckets),
            "exp_avg_sq": sum(b.exp_avg_sq.nbytes() for b in self._buckets),
        }
        nbytes["moments"] = nbytes["exp_avg"] + nbytes["exp_avg_sq"]
        nbytes["total"] = nbytes["weights"] + nbytes["master"] + nbytes["grads"] + nbytes["moments"]
        report = {k: v / max(n, 1) for k, v in nbytes.items()}
        report["num_params"] = n
        report["bytes_total"] = nbytes["total"]
        return report

    def param_formats(self) -> dict[str, dict]:
        """{name: {exp_avg, exp_avg_sq, master, shards}}: how each parameter's state is kept on this rank."""
        return {name: {"exp_avg": b.exp_avg.name, "exp_avg_sq": b.exp_avg_sq.name, "master": b.master is not None,
                       "shards": b.layout.world}
                for b in self._buckets for name in b.names}

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def _entries(self):
        for b in self._buckets:
            for i, (p, name) in enumerate(zip(b.params, b.names)):
                yield b, i, p, name

    def sharded_state_dict(self, like=None, convert: bool = False, prefix: str = "optim/") -> dict[str, torch.Tensor]:
        """The state keyed by parameter name (see the module docstring). Collective under ZeRO-1: every rank of the
        data-parallel groups calls it. like=<checkpoint dir or DCP Metadata>: empty tensors laid out like that
        checkpoint, to dcp.load into and pass to load_sharded_state_dict (ValueError on a format change unless
        convert=True)."""
        if like is not None:
            return self._template(like, convert, prefix)
        out = {f"{prefix}step": self._step_t}
        for b in self._buckets:
            master = b.gather(b.master) if b.master is not None else None
            full = {kind: (b.gather(buf.data), b.gather(buf.scale) if buf.scale is not None else None)
                    for kind, buf in b.moments()}
            for p, name, off, n, span in zip(b.params, b.names, b.layout.offsets, b.layout.numels, b.layout.spans):
                if master is not None:
                    out[f"{prefix}{name}/master"] = master[off:off + n].view(p.shape)
                for kind, buf in b.moments():
                    data, scale = full[kind]
                    if buf.fmt == "fp8":
                        out[_key(prefix, name, kind, "fp8")] = data[off:off + span]
                        out[_key(prefix, name, kind, "fp8_scale")] = scale[off // buf.block:(off + span) // buf.block]
                    else:
                        out[_key(prefix, name, kind, buf.fmt)] = data[off:off + n].view(p.shape)
        return out

    @staticmethod
    def _found_format(has, shape_of, prefix, name, kind) -> str:
        """The stored format of one moment in a checkpoint ('fp32', 'bf16', 'fp8/<block>'), from its keys."""
        for fmt in FORMATS:
            if has(_key(prefix, name, kind, fmt)):
                if fmt != "fp8":
                    return fmt
                codes = shape_of(_key(prefix, name, kind, "fp8"))
                scales = shape_of(_key(prefix, name, kind, "fp8_scale"))
                return f"fp8/{codes // max(scales, 1)}"
        raise ValueError(f"checkpoint has no {kind} for parameter {name!r} "
                         f"(looked for {_key(prefix, name, kind, '*')})")

    def _check_format(self, name, kind, saved: str, mine: str, convert: bool) -> None:
        if saved != mine and not convert:
            raise ValueError(f"{kind} of {name!r}: saved as {saved!r}, this optimizer keeps {mine!r} "
                             f"(optim.state.{kind}); set optim.convert_state=true to convert (convert=True in the API)")

    def _template(self, like, convert: bool, prefix: str) -> dict[str, torch.Tensor]:
        if isinstance(like, (str, os.PathLike)):
            from framework.checkpoint import read_metadata   # never unpickles anything but DCP's metadata
            like = read_metadata(like)
        saved = like.state_dict_metadata

        def empty(key):
            md = saved[key]
            return torch.empty(tuple(md.size), dtype=md.properties.dtype)

        numel = lambda key: torch.Size(saved[key].size).numel()  # noqa: E731
        if f"{prefix}step" not in saved:
            raise ValueError(f"checkpoint has no {prefix}step: not saved by OptimizerStateManager "
                             f"with prefix={prefix!r}")
        out = {f"{prefix}step": torch.zeros((), dtype=torch.int64)}
        for b, i, p, name in self._entries():
            for kind, buf in b.moments():
                fmt = self._found_format(lambda k: k in saved, numel, prefix, name, kind)
                self._check_format(name, kind, fmt, buf.name, convert)
                keys = [_key(prefix, name, kind, "fp8"), _key(prefix, name, kind, "fp8_scale")] \
                    if fmt.startswith("fp8") else [_key(prefix, name, kind, fmt)]
                out.update({k: empty(k) for k in keys})
            key = f"{prefix}{name}/master"
            self._check_master(name, key in saved, b.master is not None, convert)
            if key in saved:
                out[key] = empty(key)
        return out

    @staticmethod
    def _check_master(name, saved: bool, mine: bool, convert: bool) -> None:
        if saved != mine and not convert:
            raise ValueError(f"master weights of {name!r}: saved {'with' if saved else 'without'} an fp32 master, "
                             f"this optimizer keeps {'one' if mine else 'none'}; set optim.convert_state=true to convert "
                             f"(convert=True in the API)")

    @torch.no_grad()
    def load_sharded_state_dict(self, state_dict: dict, convert: bool = False, prefix: str = "optim/") -> None:
        """Restore from a dict laid out like sharded_state_dict() (any data-parallel size; every rank takes its
        shard). A moment saved in another format, or master weights present on one side only, raise ValueError
        naming both unless convert=True (then: dequantize and re-quantize; a missing master is taken from the
        params; a saved master without one here is written into the params)."""
        if f"{prefix}step" not in state_dict:
            raise ValueError(f"state_dict has no {prefix!r}step: not produced by sharded_state_dict(prefix={prefix!r})")
        for b, i, p, name in self._entries():
            n, span = b.layout.numels[i], b.layout.spans[i]
            pieces = [(lo, hi, at) for j, lo, hi, at in b.layout.pieces() if j == i]
            for kind, buf in b.moments():
                fmt = self._found_format(lambda k: k in state_dict, lambda k: state_dict[k].numel(), prefix, name, kind)
                self._check_format(name, kind, fmt, buf.name, convert)
                base = _fmt_base(fmt)
                data = state_dict[_key(prefix, name, kind, base)].reshape(-1)
                scale = state_dict.get(_key(prefix, name, kind, "fp8_scale"))
                if fmt == buf.name:   # same storage: copy the stored bytes, exact
                    for lo, hi, at in pieces:
                        dst, dst_scale = buf.views(at, at + hi - lo)
                        if buf.fmt == "fp8":
                            dst.copy_(data[lo:hi])
                            dst_scale.copy_(scale[lo // buf.block:hi // buf.block])
                        else:
                            m = max(0, min(hi, n) - lo)
                            dst[:m].copy_(data[lo:lo + m])
                else:                 # convert: logical fp32 values, re-stored in this format
                    values = torch.zeros(span)
                    values[:n] = decode(base, data, scale, sqrt=kind == "exp_avg_sq")[:n]
                    for lo, hi, at in pieces:
                        buf.write_(at, values[lo:hi])
            key = f"{prefix}{name}/master"
            saved_master = state_dict.get(key)
            self._check_master(name, saved_master is not None, b.master is not None, convert)
            if b.master is not None:
                source = saved_master if saved_master is not None else p.detach()
                flat = source.reshape(-1).float()
                for lo, hi, at in pieces:
                    m = max(0, min(hi, n) - lo)
                    b.master[at:at + m].copy_(flat[lo:lo + m])
            elif saved_master is not None:
                p.detach().copy_(saved_master.view(p.shape))
        self._step_t.copy_(state_dict[f"{prefix}step"])

    def state_dict(self) -> dict:
        """The same as sharded_state_dict() (torch's per-parameter-index format is not provided)."""
        return self.sharded_state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.load_sharded_state_dict(state_dict)
