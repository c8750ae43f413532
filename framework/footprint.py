"""Will it fit? A rough per-rank memory estimate, made before anything is allocated, and the refusal when it cannot.

The estimate is deliberately simple and stated in the message, so a user can check it:
  parameters  counted exactly by building the model on the meta device (no memory); routed experts are split over
              parallel.ep, layers over parallel.pp; DualPipe holds two parts per rank (V3 §3.2.1, Table 2: 2x parameters)
  per param   weights + gradients (4 B each in float32, 2 B in bfloat16), AdamW's two moments (4 | 2 | 2.06 B each
              for fp32 | bf16 | fp8, divided by dp under optim.zero), an fp32 master copy when weights are bf16
  activations Korthikanti et al. (2022): about (34 h + 5 a s) bytes per token per layer at 2-byte precision (twice that
              in float32), plus 12 bytes per token per vocabulary entry for the logits, their softmax and gradient;
              one micro-batch in flight with pp=1, up to pp+1 in a pipeline
It ignores allocator fragmentation, communication buffers and temporary copies, so it is a lower bound: a refused run
would certainly not fit; an accepted one may still be tight. train.memory_check=false skips the check.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

MOMENT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0 + 8.0 / 128}   # fp8: E4M3 + one fp32 scale per 128 values


@dataclass
class Footprint:
    params: float          # parameters held by one rank
    state_bytes: float     # weights, gradients, optimizer state and master copy of those parameters
    layer_bytes: float     # activations kept by the layers for backward
    logit_bytes: float     # logits, their softmax and gradient
    in_flight: int         # micro-batches whose activations are held at once
    tokens: int            # tokens per micro-batch

    @property
    def activation_bytes(self) -> float:
        return self.layer_bytes + self.logit_bytes

    @property
    def total(self) -> float:
        return self.state_bytes + self.activation_bytes


def count_parameters(model_cfg) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) of the model, built on the meta device: nothing is allocated."""
    import torch
    from omegaconf import OmegaConf

    from framework.models import build_model

    cfg = OmegaConf.to_object(model_cfg) if OmegaConf.is_config(model_cfg) else model_cfg
    with torch.device("meta"):
        model = build_model(cfg)
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in f".{name}." and "shared" not in name:
            experts += p.numel()
    return total, experts


def estimate(cfg, world_size: int) -> Footprint:
    m, p, o, t = cfg.model, cfg.parallel, cfg.optim, cfg.train
    dp = p.dp if p.dp is not None else world_size // p.pp
    total, experts = count_parameters(m)
    copies = 2 if p.schedule == "dualpipe" and p.pp > 1 else 1
    params = copies * ((total - experts) + experts / p.ep) / p.pp
    weight = 2.0 if t.dtype == "bfloat16" else 4.0
    shard = dp if o.zero else 1
    per_param = 2 * weight + (MOMENT_BYTES[o.state.exp_avg] + MOMENT_BYTES[o.state.exp_avg_sq]
                              + (4.0 if weight == 2.0 else 0.0)) / shard
    micro = t.global_batch_size // (dp * t.micro_batches)
    tokens = micro * t.seq_len
    heads = m.num_attention_heads
    per_token_layer = (34 * m.hidden_size + 5 * heads * t.seq_len) * (weight / 2)
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    in_flight = 1 if p.pp == 1 else min(t.micro_batches, p.pp + 1)
    return Footprint(params, params * per_param, in_flight * tokens * per_token_layer * layers * copies / p.pp,
                     in_flight * tokens * 12.0 * m.vocab_size, in_flight, tokens)


def available_bytes(device: str, local_world: int) -> tuple[float, str]:
    """Memory this rank may use and where the number comes from (CPU: MemAvailable shared by this node's ranks)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda': no CUDA device is visible; use train.device=cpu or auto")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
        return float(free), "free on the GPU"
    import psutil

    return psutil.virtual_memory().available / local_world, f"available RAM / {local_world} rank(s) on this node"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return ""


def check_fits(cfg, world_size: int, local_world: int = 1, available: float | None = None) -> Footprint | None:
    """Raise a one-line ValueError naming the estimate and the available memory when the run cannot fit. None when
    the model cannot be built on the meta device (then there is no estimate, and no refusal)."""
    try:
        f = estimate(cfg, world_size)
    except (NotImplementedError, RuntimeError) as e:   # an estimate must never stop a run that could train
        logging.getLogger("duet").warning(f"memory estimate skipped: {type(e).__name__}: {e}")
        return None
    where = "given"
    if available is None:
        available, where = available_bytes(cfg.train.device, local_world)
    if f.total <= available:
        return f
    t = cfg.train
    culprit = (f"model={cfg.model.name} ({f.params / 1e9:.3g} G parameters per rank)" if f.state_bytes >= f.activation_bytes
               else f"train.global_batch_size={t.global_batch_size} x train.seq_len={t.seq_len} ({f.tokens} tokens "
                    f"per micro-batch)")        # the larger part names the keys to change
    raise ValueError(
        f"{culprit} does not fit in memory: about {_size(f.total)} per rank (parameters, gradients and optimizer "
        f"state {_size(f.state_bytes)}; activations of {f.in_flight} micro-batch(es) {_size(f.activation_bytes)}, "
        f"of which logits over model.vocab_size={cfg.model.vocab_size} {_size(f.logit_bytes)}) "
        f"vs {_size(available)} {where}; shrink the model or the micro-batch (train.micro_batches), raise "
        f"parallel.pp/ep, or use optim.zero / smaller optim.state (train.memory_check=false skips this estimate)")
