"""Optimizer-state formats side by side: bytes/param, step time, and update error against fp32 states.

    python bench/optim_state.py            # the three tables (about 30 s of CPU)
    python bench/optim_state.py --study    # also: how the fp8 second moment was chosen (+7 min of CPU)

Prints markdown. Peers in the step-time table: torch.optim.AdamW (for-loop and foreach) on the same parameters.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from framework.optim import OptimizerStateManager  # noqa: E402
from framework.optim.state_format import E4M3_MAX, MomentBuffer  # noqa: E402

FORMATS = ("fp32", "bf16", "fp8")


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def make_params(n_matrices: int, dim: int, dtype=torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(dim, dim, generator=g) * 0.02).to(dtype)) for _ in range(n_matrices)]


# -- 1. bytes per parameter -------------------------------------------------------------------------------------------
def bytes_table() -> str:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in FORMATS:
            params = make_params(4, 1024, dtype)
            for p in params:
                p.grad = torch.zeros_like(p)
            r = OptimizerStateManager(params, exp_avg=fmt, exp_avg_sq=fmt).memory_report()
            rows.append([str(dtype).replace("torch.", ""), fmt, r["weights"], r["master"], r["grads"], r["exp_avg"],
                         r["exp_avg_sq"], r["moments"], r["total"]])
    return table(["params", "moments", "weights", "master", "grads", "exp_avg", "exp_avg_sq", "moments B/param",
                  "total B/param"], rows)


# -- 2. step time -----------------------------------------------------------------------------------------------------
def time_steps(opt, params, steps: int) -> tuple[float, float]:
    """Best of `steps` optimizer steps: (CPU ms of this process, wall ms). On a shared machine the CPU time is the
    steadier of the two."""
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype) * 1e-3
    opt.step()  # warm-up (first-touch allocations)
    cpu = wall = math.inf
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        opt.step()
        cpu, wall = min(cpu, time.process_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu * 1e3, wall * 1e3


def time_table(n_matrices: int, dim: int, steps: int) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = n_matrices * dim * dim
    rows, base = [], None
    peers = [("torch AdamW (for-loop)", dict(foreach=False)), ("torch AdamW (foreach)", dict(foreach=True))]
    for label, kw in peers:
        params = make_params(n_matrices, dim)
        cpu, wall = time_steps(torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, **kw),
                               params, steps)
        rows.append([label, "fp32", cpu, wall, "-"])
    for fmt in FORMATS:
        params = make_params(n_matrices, dim)
        cpu, wall = time_steps(OptimizerStateManager(params, lr=1e-3, exp_avg=fmt, exp_avg_sq=fmt), params, steps)
        base = base or cpu
        rows.append(["OptimizerStateManager", fmt, cpu, wall, f"{cpu / base:.2f}x"])
    torch.set_num_threads(threads)
    return f"{n / 1e6:.1f}M fp32 parameters, 1 thread, best of {steps} steps\n\n" + \
        table(["optimizer", "moments", "step CPU ms", "step wall ms", "CPU vs manager fp32"], rows)


# -- 3. update error on a noisy quadratic ----------------------------------------------------------------------------
def quadratic_problem(n: int, seed: int = 0):
    """loss = 0.5 * sum_i h_i (x_i - c_i)^2, gradient noise sigma * sqrt(h_i): curvatures spread over 3 decades."""
    g = torch.Generator().manual_seed(seed)
    h = 10 ** (3 * torch.rand(n, generator=g) - 2)           # [1e-2, 10]
    c = torch.randn(n, generator=g)
    return h, c


def quadratic_table(steps: int = 200, n: int = 1 << 18) -> str:
    h, c = quadratic_problem(n)
    lr, sigma = 1e-2, 1.0
    loss = lambda x: 0.5 * (h * (x - c) ** 2).sum().item()  # noqa: E731
    x0 = torch.zeros(n)

    def manager(fmt):
        p = torch.nn.Parameter(x0.clone().view(512, -1))
        return p, OptimizerStateManager([p], lr=lr, weight_decay=0.0, exp_avg=fmt, exp_avg_sq=fmt)

    # open loop: every format sees the gradients of the fp32 trajectory; each step starts from the fp32 weights
    ref_p, ref = manager("fp32")
    shadows = {fmt: manager(fmt) for fmt in ("bf16", "fp8")}
    errors = {fmt: [] for fmt in shadows}
    noise = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = ref_p.detach().view(-1)
        grad = (h * (x - c) + sigma * h.sqrt() * torch.randn(n, generator=noise)).view(ref_p.shape)
        before = ref_p.detach().clone()
        ref_p.grad = grad
        ref.step()
        du = ref_p.detach() - before
        for fmt, (p, opt) in shadows.items():
            p.detach().copy_(before)
            p.grad = grad
            opt.step()
            errors[fmt].append(((p.detach() - before - du).norm() / du.norm()).item())
    # closed loop: each format follows its own trajectory under the same noise sequence
    final = {}
    for fmt in FORMATS:
        p, opt = manager(fmt)
        noise = torch.Generator().manual_seed(7)
        for _ in range(steps):
            x = p.detach().view(-1)
            p.grad = (h * (x - c) + sigma * h.sqrt() * torch.randn(n, generator=noise)).view(p.shape)
            opt.step()
        final[fmt] = loss(p.detach().view(-1))
    rows = [[fmt, sum(errors[fmt]) / steps if fmt in errors else 0.0, max(errors[fmt]) if fmt in errors else 0.0,
             final[fmt], final[fmt] / final["fp32"]] for fmt in FORMATS]
    return (f"{n} parameters, {steps} AdamW steps (lr {lr}, betas (0.9, 0.95)), loss0 = {loss(x0):.4g}\n\n"
            + table(["moments", "mean update error", "max update error", "final loss", "vs fp32"], rows))


# -- 4. the fp8 second-moment study ----------------------------------------------------------------------------------
class _Codec:
    """One stored moment: ('bf16' | 'shipped' | 'asis' | 'asis_nonzero' | 'coat'), on [n] fp32 values."""

    def __init__(self, kind, n, block=128, sqrt=False, kmin=0.0, kmax=8.0):
        self.kind, self.block, self.kmin, self.kmax = kind, block, kmin, kmax
        if kind in ("bf16", "shipped"):
            self.buf = MomentBuffer(n, "bf16" if kind == "bf16" else "fp8", block, sqrt=sqrt)

    def store(self, x):
        if self.kind in ("bf16", "shipped"):
            return self.buf.store_(x.clone())   # store_ may use its argument as scratch
        blocks = x.view(-1, self.block)
        a = blocks.abs()
        amax = a.amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        if self.kind == "coat":   # COAT: f(x) = sign(x)|x|^k, k per block so the block spans the E4M3 normal range
            amin = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(1, keepdim=True)
            k = (math.log(E4M3_MAX / 2 ** -6) / torch.log(amax / amin)).nan_to_num(self.kmax, self.kmax, self.kmax)
            self.k = k.clamp(self.kmin, self.kmax).bfloat16().float()
            y = (a / amax).pow(self.k) * E4M3_MAX
        else:
            y = a / amax * E4M3_MAX
        if self.kind in ("coat", "asis_nonzero"):
            y = torch.where(y > 0, y.clamp(min=2 ** -9), y)
        self.codes, self.amax = (y * blocks.sign()).to(torch.float8_e4m3fn), amax

    def load(self):
        if self.kind in ("bf16", "shipped"):
            return self.buf.load().clone()
        y = self.codes.float() / E4M3_MAX
        if self.kind == "coat":
            y = y.sign() * y.abs().pow(1 / self.k)
        return (y * self.amax).view(-1)


def study_run(m_codec, v_codec, spread, dying, steps=300, n=1 << 18, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 10 ** (spread * torch.randn(n, generator=g))             # per-element gradient scale
    mu = 0.3 * torch.randn(n, generator=g)                      # a persistent signal under the noise
    dies_at = torch.where(torch.rand(n, generator=g) < dying, torch.randint(1, steps, (n,), generator=g), steps + 1)
    b1, b2, eps = 0.9, 0.95, 1e-8
    m, v = torch.zeros(n), torch.zeros(n)
    m_codec.store(m.clone()), v_codec.store(v.clone())
    errs, worst = [], 0.0
    for t in range(1, steps + 1):
        grad = s * (mu + torch.randn(n, generator=g))
        grad[dies_at <= t] = 0
        mq, vq = m_codec.load(), v_codec.load()
        for a, b in ((m, v), (mq, vq)):
            a.lerp_(grad, 1 - b1)
            b.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_codec.store(mq), v_codec.store(vq)
        u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        uq = (mq / (1 - b1 ** t)) / ((vq / (1 - b2 ** t)).sqrt() + eps)
        errs.append(((uq - u).norm() / u.norm()).item())
        worst = max(worst, ((uq - u).abs().max() / u.abs().max()).item())
    return sum(errs) / steps, worst


def study_table(b: int = 128) -> str:
    n = 1 << 18
    candidates = {
        "bf16 / bf16": lambda: (_Codec("bf16", n), _Codec("bf16", n)),
        "fp8 / fp8, v as is": lambda: (_Codec("asis", n, b), _Codec("asis", n, b)),
        "fp8 / fp8, v as is, nonzero kept": lambda: (_Codec("asis", n, b), _Codec("asis_nonzero", n, b)),
        "fp8 / fp8, sqrt(v), never 0 (shipped)": lambda: (_Codec("shipped", n, b), _Codec("shipped", n, b, sqrt=True)),
        "COAT, k per block in [0.1, 8] (both)": lambda: (_Codec("coat", n, b, kmin=0.1),
                                                         _Codec("coat", n, b, kmin=0.1)),
        "COAT, k per block in [0.5, 8] (both)": lambda: (_Codec("coat", n, b, kmin=0.5),
                                                         _Codec("coat", n, b, kmin=0.5)),
    }
    rows = []
    for label, make in candidates.items():
        row = [label]
        for spread, dying in ((0.5, 0.0), (0.5, 0.05), (1.0, 0.05)):
            mean, worst = study_run(*make(), spread, dying, n=n)
            row.append(mean)
        row.append(worst)
        rows.append(row)
    return table(["m / v storage", "spread 0.5", "0.5 + dying", "1.0 + dying", "worst (1.0 + dying)"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", action="store_true", help="also run the fp8 second-moment study")
    ap.add_argument("--dim", type=int, default=1024, help="step-time set: matrices of dim x dim")
    ap.add_argument("--matrices", type=int, default=4)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--block", type=int, default=128, help="fp8 block of the --study")
    args = ap.parse_args()
    from bench.common import machine, write_report

    cmd = "python -m bench.optim_state" + (" --study" if args.study else "")
    parts = ["### Optimizer state manager", "", f"Command: `{cmd}`; {machine()}.", "",
             "#### Bytes per parameter (memory_report, 4 x 1024 x 1024)", "", bytes_table(), "",
             "#### Optimizer step time", "", time_table(args.matrices, args.dim, args.steps), "",
             "#### Update error vs fp32 states: noisy quadratic", "", quadratic_table()]
    if args.study:
        parts += ["", f"#### fp8 second moment: update error ||u_q - u|| / ||u|| vs fp32 states (300 steps, 262144 "
                      f"values, block {args.block})", "", study_table(args.block)]
    write_report("optim_state", "\n".join(parts))

if __name__ == "__main__":
    main()
