"""FP8 linear layers with the DeepSeek-V3 recipe (V3 §3.3): E4M3 for Fprop, Dgrad and Wgrad.

  Fprop  Y  = X W^T      X in 1x128 tiles, W in 128x128 blocks
  Dgrad  dX = dY W       dY in 1x128 tiles, W's blocks transposed (same scales, transposed)
  Wgrad  dW = dY^T X     both re-tiled 128x1, i.e. tiled along tokens, the dim this GEMM reduces over

Only the FP8 copy of X (values + scales) is kept for backward, not X itself (V3 §3.3.3: cached activations in
FP8); Wgrad dequantizes it and re-quantizes along tokens, as V3 does. Every GEMM accumulates in fp32 with the
scales applied per 128-wide K group (§3.3.2). Bias, output and gradients stay in the caller's precision.

Kept out of FP8 (V3 §3.3): embedding, output head, MoE router, norms, attention core; convert_to_fp8 skips them.
"""
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.weight_grad import weight_grads

from . import quantize as Q

BACKENDS = ("torch", "triton", "auto")

# V3 §3.3: modules kept in high precision. Only nn.Linear is ever swapped, so norms and embeddings are excluded
# by type; these patterns catch the linears among them: the output head (and the MTP head), the MoE router
# ("*gate" ends in "gate": it matches "mlp.gate" but not the SwiGLU "gate_proj").
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*head*", "*gate", "*router*", "*norm*")


# ----------------------------------------------------------------------------------------------------------
# backends


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"fp8 backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend, device):
    """'auto' -> 'triton' where its kernels run on `device` (a CUDA GPU with FP8 tensor cores and triton
    installed), else 'torch'. An explicit 'triton' where it cannot run raises a ValueError saying why."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            from . import triton_kernels
            return "triton" if triton_kernels.available(device) else "torch"
        return "torch"
    if backend == "triton":
        from . import triton_kernels
        triton_kernels.check_device(device)
    return backend


def _grouped_gemm(backend):
    """fp8_grouped_gemm of a resolved backend: one triton launch for all experts, or the torch reference loop."""
    if backend == "triton":
        from . import triton_kernels
        return triton_kernels.fp8_grouped_gemm
    return Q.fp8_grouped_gemm


def _kernels(backend):
    """(quantize_act, fp8_gemm) of a resolved backend."""
    if backend == "triton":
        from . import triton_kernels
        return triton_kernels.quantize_act, triton_kernels.fp8_gemm
    return Q.quantize_act, Q.fp8_gemm


# ----------------------------------------------------------------------------------------------------------
# metrics


@dataclass
class QuantStats:
    """Running counts over the tensors one role (x, w or dy) quantized since the last reset.

    saturated: elements with |x| > 464 * scale: scaled values past the midpoint between 448 and the next E4M3
        step (480, not representable in e4m3fn), i.e. the values the saturating cast changed (464 itself rounds
        to 448, ties to even). With
        online per-tile amax scaling this is 0 by construction; it would flag delayed or external scales.
    underflow: nonzero elements that became 0 in FP8 (smaller than half the smallest subnormal of their tile,
        i.e. below 2^-10 / 448 ~ 2^-18.8 of the tile's amax): the precision loss that does happen, mostly in
        gradients.
    """
    amax: torch.Tensor | None = None  # largest |x| seen (a 0-d tensor on the data's device: no host sync)
    saturated: torch.Tensor | None = None
    underflow: torch.Tensor | None = None
    total: int = 0

    def observe(self, tiles, q, scale):
        """tiles: the high-precision input viewed as tiles, broadcastable against `scale` (one scale per tile,
        with singleton dims where the tile extends); q: the E4M3 values, any shape with the input's elements."""
        a = tiles.detach().abs()
        amax = a.amax() if a.numel() else a.new_zeros(())
        saturated = torch.count_nonzero(a > 464.0 * scale)
        # zeros stay zeros, so the nonzeros lost in the cast are the difference of the two counts (-0.0 == 0)
        underflow = torch.count_nonzero(a) - torch.count_nonzero(q.float())
        if self.total == 0:
            self.amax, self.saturated, self.underflow = amax, saturated, underflow
        else:
            self.amax = torch.maximum(self.amax, amax)
            self.saturated = self.saturated + saturated
            self.underflow = self.underflow + underflow
        self.total += q.numel()

    def summary(self):
        if self.total == 0:
            return {}
        return {"amax": float(self.amax), "saturated_frac": float(self.saturated) / self.total,
                "underflow_frac": float(self.underflow) / self.total}


@dataclass
class Fp8Stats:
    """FP8 health of one layer: inputs (x), weights (w), output gradients (dy)."""
    x: QuantStats = field(default_factory=QuantStats)
    w: QuantStats = field(default_factory=QuantStats)
    dy: QuantStats = field(default_factory=QuantStats)

    def reset(self):
        self.x, self.w, self.dy = QuantStats(), QuantStats(), QuantStats()


def _observe_act(stats, x2, q, s):
    """x2 [M, K] with its 1x128 tile scales s [M, G]."""
    if stats is not None:
        M, K = x2.shape
        tiles = (x2.float().view(M, 1, K) if s.shape[1] == 1  # one tile per row: no padding needed
                 else Q._pad_dim(x2.float(), 1, Q.BLOCK).view(*s.shape, Q.BLOCK))  # [M, G, 128]
        stats.observe(tiles, q, s.unsqueeze(-1))


def _observe_weight(stats, w, q, s):
    """w [..., N, K] with its 128x128 block scales s [..., Nb, Kb]."""
    if stats is not None:
        w3 = Q._pad_dim(Q._pad_dim(w.reshape(-1, *w.shape[-2:]).float(), 1, Q.BLOCK), 2, Q.BLOCK)
        B, Np, Kp = w3.shape
        tiles = w3.view(B, Np // Q.BLOCK, Q.BLOCK, Kp // Q.BLOCK, Q.BLOCK)
        stats.observe(tiles, q, s.reshape(B, Np // Q.BLOCK, 1, Kp // Q.BLOCK, 1))


# ----------------------------------------------------------------------------------------------------------
# autograd


def _dgrad(quant, gemm, dy2, wq, ws, pow2, stats):
    """dX [M, K] = dY [M, N] @ W [N, K]: dY in 1x128 tiles along N; W^T's blocks are W's blocks transposed."""
    dyq, dys = quant(dy2, pow2=pow2)
    _observe_act(stats, dy2, dyq, dys)
    return gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous())


def _wgrad(quant, gemm, dy2, xq, xs, pow2):
    """dW [N, K] = dY^T [N, M] @ X [M, K], both operands tiled 128x1 along the M tokens (V3 §3.3)."""
    x = Q.dequantize_act(xq, xs)  # [M, K] fp32: the cached FP8 activation, re-tiled below
    xtq, xts = quant(x.t().contiguous(), pow2=pow2)  # X^T [K, M], 1x128 tiles along tokens
    dytq, dyts = quant(dy2.t().contiguous(), pow2=pow2)  # dY^T [N, M]
    return gemm(dytq, dyts, xtq, xts)  # "weight" operand X^T has per-row scales [K, G_M]


class Fp8LinearFunction(torch.autograd.Function):
    """y = x @ weight^T + bias with the three GEMMs in block-scaled E4M3 (see the module docstring).

    x [..., K] any float dtype, weight [N, K], bias [N] or None; y [..., N] in x's dtype.
    backend must be resolved ('torch' or 'triton'); stats an Fp8Stats or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, backend, pow2, stats):
        quant, gemm = _kernels(backend)
        *lead, K = x.shape
        x2 = x.reshape(-1, K)  # [M, K]
        xq, xs = quant(x2, pow2=pow2)  # [M, K] E4M3, [M, G] fp32
        wq, ws = Q.quantize_weight(weight.detach(), pow2=pow2)  # [N, K] E4M3, [Nb, G] fp32
        if stats is not None:
            _observe_act(stats.x, x2, xq, xs)
            _observe_weight(stats.w, weight, wq, ws)
        out = gemm(xq, xs, wq, ws)  # [M, N] fp32
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(xq, xs, wq, ws)  # FP8 copies only: ~1 byte per element + scales
        ctx.weight, ctx.bias = weight, bias  # by handle: their gradients may be deferred (framework/weight_grad.py)
        ctx.meta = (backend, pow2, stats, x.dtype)
        return out.to(x.dtype).view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        backend, pow2, stats, x_dtype = ctx.meta
        weight, bias = ctx.weight, ctx.bias
        quant, gemm = _kernels(backend)
        N, K = wq.shape
        lead = dy.shape[:-1]
        dy2 = dy.reshape(-1, N).float()  # [M, N]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _dgrad(quant, gemm, dy2, wq, ws, pow2, None if stats is None else stats.dy).to(x_dtype).view(*lead, K)

        def compute():  # Wgrad from the cached FP8 input, now or in W
            return (_wgrad(quant, gemm, dy2, xq, xs, pow2).to(weight.dtype),
                    None if bias is None else dy2.sum(0).to(bias.dtype))

        return (dx, *weight_grads(ctx, (weight, bias), compute), None, None, None)


def fp8_linear(x, weight, bias=None, backend="auto", pow2=False, stats=None):
    """Functional form of Fp8Linear: x [..., K], weight [N, K], bias [N] -> [..., N] in x's dtype."""
    Q._check_float("x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    return Fp8LinearFunction.apply(x, weight, bias, resolve_backend(backend, x.device), bool(pow2), stats)


class Fp8Linear(nn.Linear):
    """Drop-in nn.Linear computing in FP8 (same parameters and state_dict keys).

    backend: 'torch' (exact emulation, any device), 'triton' (kernels; CUDA, or CPU under TRITON_INTERPRET=1),
    'auto' (triton on CUDA GPUs with FP8 tensor cores, torch elsewhere). pow2: power-of-2 (ue8m0) scales.
    track_stats: keep an Fp8Stats (costs one extra elementwise pass per quantized tensor).
    """
    defers_weight_grad = True

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 backend="auto", pow2=False, track_stats=True):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        check_backend(backend)
        self.backend = backend
        self.pow2 = bool(pow2)
        self.fp8_stats = Fp8Stats() if track_stats else None

    @classmethod
    def from_linear(cls, linear, **kwargs):
        """An Fp8Linear that shares `linear`'s Parameter objects (optimizers holding them stay valid)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x):
        # statistics describe training steps: a validation pass (no grad) would mix into the next step's numbers
        stats = self.fp8_stats if torch.is_grad_enabled() else None
        return fp8_linear(x, self.weight, self.bias, self.backend, self.pow2, stats)

    def extra_repr(self):
        return f"{super().extra_repr()}, backend={self.backend}, pow2={self.pow2}"


# ----------------------------------------------------------------------------------------------------------
# model conversion and metrics


class Fp8ExpertGemms:
    """The `linear_fn` of a MoE Experts module in FP8: both expert GEMMs (gate_up, then down) run through
    fp8_grouped_linear, with the Fp8Linear recipe, and keep one Fp8Stats per projection."""

    defers_weight_grad = True
    PROJS = ("gate_up_proj", "down_proj")

    def __init__(self, backend="auto", pow2=False, track_stats=True):
        check_backend(backend)
        self.backend, self.pow2 = backend, bool(pow2)
        self.stats = {p: Fp8Stats() for p in self.PROJS} if track_stats else None

    def __call__(self, x_sorted, counts, weight, proj):
        if proj not in self.PROJS:
            raise ValueError(f"proj must be one of {self.PROJS}, got {proj!r}")
        stats = self.stats[proj] if self.stats is not None and torch.is_grad_enabled() else None
        return fp8_grouped_linear(x_sorted, counts, weight, self.backend, self.pow2, stats)

    def __repr__(self):
        return f"Fp8ExpertGemms(backend={self.backend}, pow2={self.pow2})"


def _check_exclude(exclude):
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"exclude must be a list of fnmatch patterns (str), got {exclude!r}")


def _excluded(name, exclude):
    return any(fnmatch.fnmatchcase(name, p) for p in exclude)


def expert_modules(model, exclude=()):
    """(name, module) of every grouped-expert module whose GEMMs a precision hook may replace: a module declares
    it takes one with `takes_linear_fn = True` (MoE Experts) and is left alone once its `linear_fn` is set."""
    return [(name, m) for name, m in model.named_modules()
            if getattr(m, "takes_linear_fn", False) and m.linear_fn is None and not _excluded(name, exclude)]


def convert_to_fp8(model, exclude=DEFAULT_EXCLUDE, backend="auto", pow2=False, track_stats=True):
    """Swap every plain nn.Linear of `model` whose qualified name matches no `exclude` pattern for an Fp8Linear,
    and route the GEMMs of every MoE Experts module (same rule on its name) through FP8 (Fp8ExpertGemms).

    Patterns are fnmatch globs against names from model.named_modules() (e.g. "layers.0.mlp.gate").
    Subclasses of nn.Linear are left alone (they may have their own forward), as are Experts whose linear_fn is
    already set. Parameters are shared, not copied. Returns the converted names in module order.
    """
    check_backend(backend)
    _check_exclude(exclude)
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear: convert_to_fp8 swaps children; wrap it in a container "
                         "or use Fp8Linear.from_linear")
    experts = dict(expert_modules(model, exclude))
    names = [name for name, m in model.named_modules()
             if (type(m) is nn.Linear and not _excluded(name, exclude)) or name in experts]
    for name in names:
        if name in experts:
            experts[name].linear_fn = Fp8ExpertGemms(backend=backend, pow2=pow2, track_stats=track_stats)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child), backend=backend, pow2=pow2,
                                                     track_stats=track_stats))
    return names


def iter_fp8_stats(model):
    """(layer name, Fp8Stats) of every FP8 GEMM site of `model`: each Fp8Linear, and each projection of FP8
    experts ("<experts module>.gate_up_proj", "<experts module>.down_proj")."""
    for name, m in model.named_modules():
        stats = getattr(m, "fp8_stats", None)
        if isinstance(stats, Fp8Stats):
            yield name, stats
        hook = getattr(m, "linear_fn", None)
        if isinstance(hook, Fp8ExpertGemms) and hook.stats is not None:
            for proj, st in hook.stats.items():
                yield f"{name}.{proj}" if name else proj, st


def collect_fp8_stats(model, reset=True):
    """Per-layer and overall FP8 metrics since the last reset, as floats for the metrics sink.

    Keys: "fp8/<layer>/<role>_<metric>" and "fp8/<role>_<metric>" (all layers), role in x, w, dy and metric in
    amax, saturated_frac, underflow_frac. Reading them synchronizes with the device once per value; for every
    step, framework.fp8.metrics.fp8_metrics gives the per-role summary with a single synchronization.
    """
    out = {}
    totals = {}
    for name, stats in iter_fp8_stats(model):
        for role in ("x", "w", "dy"):
            rs = getattr(stats, role)
            for key, value in rs.summary().items():
                out[f"fp8/{name}/{role}_{key}"] = value
            if rs.total:
                t = totals.setdefault(role, [0.0, 0.0, 0.0, 0])
                t[0] = max(t[0], float(rs.amax))
                t[1] += float(rs.saturated)
                t[2] += float(rs.underflow)
                t[3] += rs.total
        if reset:
            stats.reset()
    for role, (amax, sat, under, total) in totals.items():
        out[f"fp8/{role}_amax"] = amax
        out[f"fp8/{role}_saturated_frac"] = sat / total
        out[f"fp8/{role}_underflow_frac"] = under / total
    return out


# ----------------------------------------------------------------------------------------------------------
# MoE experts


def expert_segments(counts, total: int) -> list[tuple[int, int]]:
    """(start, count) of each expert's rows in an expert-sorted [total, K] input, from per-expert counts (a 1-D
    integer tensor or a list of ints); one-line ValueError when they are not that or do not sum to total."""
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1 or counts.is_floating_point():
            raise ValueError(f"counts must be a 1-D integer tensor or list of ints, got {counts.dtype} "
                             f"of shape {tuple(counts.shape)}")
        counts = counts.tolist()  # host ints are needed to slice the segments (one sync on GPU)
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != total:
        raise ValueError(f"counts must be >= 0 and sum to the {total} rows of the input, got {counts}")
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    return list(zip(starts, counts))


class Fp8GroupedLinearFunction(torch.autograd.Function):
    """Expert e maps rows [start_e, start_e + count_e) of x with weights[e]; same FP8 recipe as Fp8LinearFunction.

    The 1x128 tiles of x and dY belong to single tokens, so they are quantized once for all experts, and Fprop and
    Dgrad run as one grouped GEMM over the experts' row ranges (one triton launch; a loop in the torch reference).
    The Wgrad tiles run along tokens and must not straddle two experts, so Wgrad is cut per expert.
    """

    @staticmethod
    def forward(ctx, x, weights, segments, backend, pow2, stats):
        quant, _ = _kernels(backend)
        E, N, K = weights.shape
        xq, xs = quant(x, pow2=pow2)  # [T, K], [T, G]
        wq, ws = Q.quantize_weight(weights.detach(), pow2=pow2)  # [E, N, K], [E, Nb, G]
        if stats is not None:
            _observe_act(stats.x, x, xq, xs)
            _observe_weight(stats.w, weights, wq, ws)
        out = _grouped_gemm(backend)(xq, xs, wq, ws, [c for _, c in segments])  # [T, N] fp32
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.weight = weights  # by handle: its gradient may be deferred (framework/weight_grad.py)
        ctx.meta = (segments, backend, pow2, stats, x.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        segments, backend, pow2, stats, x_dtype = ctx.meta
        weights = ctx.weight
        quant, gemm = _kernels(backend)
        E, N, K = wq.shape
        dy2 = dy.float()
        dx = None
        if ctx.needs_input_grad[0]:
            dyq, dys = quant(dy2, pow2=pow2)  # per-token tiles: once for all experts
            if stats is not None:
                _observe_act(stats.dy, dy2, dyq, dys)
            # dY_e @ W_e: the transposed weights' 128x128 blocks are the transposed block scales
            dx = _grouped_gemm(backend)(dyq, dys, wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous(),
                                        [c for _, c in segments]).to(x_dtype)

        def compute():  # Wgrad per expert from the cached FP8 input, now or in W
            dw = torch.zeros(E, N, K, dtype=torch.float32, device=dy.device)
            for e, (s, c) in enumerate(segments):
                if c:
                    dw[e] = _wgrad(quant, gemm, dy2[s:s + c], xq[s:s + c], xs[s:s + c], pow2)
            return (dw.to(weights.dtype),)

        return (dx, *weight_grads(ctx, (weights,), compute), None, None, None, None)


def fp8_grouped_linear(x_sorted, counts, weights, backend="auto", pow2=False, stats=None):
    """FP8 expert GEMMs over tokens already permuted by expert.

    x_sorted [T, K] (expert 0's tokens first, then expert 1's, ...), counts [E] ints (list or tensor) summing
    to T, weights [E, N, K] -> [T, N] in x_sorted's dtype; differentiable w.r.t. x_sorted and weights.
    Equal to applying Fp8Linear(weights[e]) to each expert's rows.
    """
    Q._check_float("x_sorted", x_sorted)
    if x_sorted.dim() != 2:
        raise ValueError(f"x_sorted must be 2-D [tokens, K], got shape {tuple(x_sorted.shape)}")
    if weights.dim() != 3 or weights.shape[2] != x_sorted.shape[1]:
        raise ValueError(f"weights must be [E, N, {x_sorted.shape[1]}], got shape {tuple(weights.shape)}")
    segments = expert_segments(counts, x_sorted.shape[0])
    if len(segments) != weights.shape[0]:
        raise ValueError(f"counts has {len(segments)} experts but weights has {weights.shape[0]}")
    backend = resolve_backend(backend, x_sorted.device)
    return Fp8GroupedLinearFunction.apply(x_sorted, weights, tuple(segments), backend, bool(pow2), stats)
