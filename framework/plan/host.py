"""Host time of this project's own layers per counted operator, in forward, input-gradient and weight-gradient passes.

On cpu an eager layer costs, besides its arithmetic, a fixed time per call that does not shrink with the tokens:
module calls, the Python of MLA / router / MoE, the autograd Functions every weight declares (framework/weight_grad.py:
a forward apply, a Python backward and a weight-gradient closure each), and weight-sized gradient buffers written in
W. A synthetic chain of `z * 1.0001` (devices.compute_speeds' operator probe) prices none of that: one process of
make train's parts runs 2-4x the fixed time the chain predicts for their operator count (bench/plan.py --parts).

So the probe runs the model's own pieces, a dense block, a MoE block and the head (norm, output head, loss, MTP
depths), at a handful of tokens, where the fixed time is nearly all there is, with their weight gradients split
off as the pipeline does, and divides each pass's time by the pieces' forward operator count (layers.py: `ops`,
recounted with a dispatch mode in tests/framework/plan). The planner charges `ops` x these per-operator figures
for F, B and W of every part.
"""
from __future__ import annotations

import statistics
import time

HOST_TOKENS = 8                 # tokens per piece: the arithmetic left at this size is < 2% of a 512-token pass
MAX_PARAMS = 50_000_000         # build the pieces only for models this small (the 671B preset is planned, not run)
CALLS = 7                       # calls per piece and round; the first is a warm-up


def per_operator(times: dict, ops: dict) -> tuple[float, float, float]:
    """(F, B, W) host seconds per forward operator: each pass's seconds summed over the pieces, over their ops."""
    total = sum(ops[k] for k in times)
    return tuple(sum(times[k][i] for k in times) / total for i in range(3))


def _pieces(model_cfg):
    """name -> (forward() -> tensor to back-propagate, forward operator count of layers.py) of the model's own
    dense block, MoE block and head, weights split as a pipeline part's (schedules.weight_grad)."""
    import torch

    from framework.models import build_model
    from framework.plan.layers import block_cost, head_cost, is_moe_layer
    from schedules.weight_grad import enable_weight_grad_split

    torch.manual_seed(0)
    model = build_model(model_cfg)
    model.train()
    enable_weight_grad_split(model)
    C, V, L = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.num_hidden_layers
    ids = torch.randint(0, V, (1, HOST_TOKENS))

    def block(i):
        layer = model.layers[i]

        def forward():
            y = layer(torch.randn(1, HOST_TOKENS, C, requires_grad=True))
            if hasattr(layer.mlp, "take_balance_loss"):
                layer.mlp.take_balance_loss()
            return y
        return forward

    out = {}
    for moe in (False, True):
        i = next((i for i in range(L) if is_moe_layer(model_cfg, i) == moe), None)
        if i is not None:
            out["moe block" if moe else "dense block"] = (block(i), block_cost(model_cfg, moe, 1, 4, False, False).ops)
    tied = bool(getattr(model_cfg, "tie_word_embeddings", False))
    out["head"] = (lambda: model.final(torch.randn(1, HOST_TOKENS, C, requires_grad=True), ids, ids)[0],
                   head_cost(model_cfg, 1, 4, False, False, tied).ops)
    return model, out


def _passes(model, forward) -> tuple[float, float, float]:
    """One call's (F, B, W) seconds: forward, input-gradient backward with the weight gradients deferred, then W."""
    import torch

    from framework.weight_grad import WeightGradStore, run_weight_grads

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    y = forward()
    t1 = time.perf_counter()
    WeightGradStore.enabled = True
    try:
        y.backward(None if y.dim() == 0 else torch.ones_like(y))
    finally:
        WeightGradStore.enabled = False
    funcs = WeightGradStore.take_cache()
    t2 = time.perf_counter()
    run_weight_grads(funcs)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def layer_operator_seconds(model_cfg, between=lambda: None, rounds: int = 5):
    """(F, B, W) host seconds per forward operator of model_cfg's own layers (`per_operator` over the medians of
    each piece's passes, over `rounds` rounds that `between()` lines up), or None for a model too large to build
    here."""
    from framework.plan.layers import model_parameters

    if model_parameters(model_cfg, include_mtp=True) > MAX_PARAMS:
        return None
    model, pieces = _pieces(model_cfg)
    samples: dict = {k: [] for k in pieces}
    for _ in range(rounds):
        between()
        for name, (forward, _) in pieces.items():
            samples[name] += [_passes(model, forward) for _ in range(CALLS)][1:]
    times = {k: tuple(statistics.median(s[i] for s in v) for i in range(3)) for k, v in samples.items()}
    return per_operator(times, {k: ops for k, (_, ops) in pieces.items()})


LOGIT_ROWS = 512                # tokens of the probe's log-softmax: make train's micro-batch (4 x 128)


def head_seconds(model_cfg, seconds_per_call, between=lambda: None, rounds: int = 5) -> dict:
    """What the head spends beyond its GEMMs and per-operator time, per unit: `logit_s`, the (F, B) seconds per
    logit of log-softmax and the loss over [LOGIT_ROWS, V] (the exponentials make it ~2x its traffic price), and
    `zero_s`, the seconds per value of a fresh V x C buffer zeroed (an embedding's dense weight gradient: the
    pages are new each call). Medians over `rounds` rounds that `between()` lines up; {} for a model too large."""
    import torch
    import torch.nn.functional as F

    from framework.plan.layers import model_parameters

    if model_parameters(model_cfg, include_mtp=True) > MAX_PARAMS:
        return {}
    V, C = model_cfg.vocab_size, model_cfg.hidden_size
    logits = torch.randn(LOGIT_ROWS, V, requires_grad=True)
    labels = torch.randint(0, V, (LOGIT_ROWS,))

    def forward():
        return F.cross_entropy(logits, labels)

    def backward():
        logits.grad = None
        forward().backward()

    f, fb, z = [], [], []
    for _ in range(rounds):
        between()
        f.append(seconds_per_call(forward, 0.02))
        fb.append(seconds_per_call(backward, 0.03))
        z.append(seconds_per_call(lambda: torch.zeros(V, C), 0.01))
    n = LOGIT_ROWS * V
    fwd = statistics.median(f)
    return {"logit_s": (fwd / n, max(statistics.median(fb) - fwd, 0.0) / n), "zero_s": statistics.median(z) / (V * C)}
