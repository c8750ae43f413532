"""Triton kernels (framework/fp8/triton_kernels.py) against the torch reference, on CPU under triton's interpreter.

Triton picks interpreted or compiled kernels when `@triton.jit` runs, i.e. when framework.fp8.triton_kernels is
imported, from TRITON_INTERPRET. So the checks run in ONE child process started with TRITON_INTERPRET=1 (this
file executed as a script), which leaves triton in the pytest process untouched. The child measures;
the tests below assert. Shapes are tiny: each interpreted program instance costs milliseconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _worker():
    """Runs in the child: returns {check name: number}."""
    import torch

    torch.set_num_threads(1)
    from framework.fp8 import Fp8Linear, fp8_grouped_linear
    from framework.fp8 import quantize as Q
    from framework.fp8 import triton_kernels as T

    assert T.INTERPRETED, "the child must run with TRITON_INTERPRET=1"
    out = {}
    g = torch.Generator().manual_seed(0)

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).abs().max() / b.abs().max()).item()

    # --- quantization: bit-exact (E4M3 codes and fp32 scales) ---
    codes = torch.arange(0, 127, dtype=torch.uint8).view(Q.E4M3).float()
    ties = torch.cat([codes, (codes[1:] + codes[:-1]) / 2])  # grid points and exact midpoints, amax 448
    ties = torch.cat([ties, -ties, torch.zeros(-2 * ties.numel() % 128)]).view(-1, 128)
    ties[:, 0] = 448.0
    wide = torch.randn(32, 256, generator=g) * torch.logspace(-9, 4, 256)  # subnormal range and big tiles
    wide[3, :128] = 0.0  # a zero tile
    wide[4, 5] = -0.0
    cases = {
        "ties": (ties.reshape(1, -1), False),
        "wide": (wide, False),
        "wide_pow2": (wide, True),
        "rows4_k256": (torch.randn(4, 256, generator=g), False),
        "pad_k200": (torch.randn(5, 200, generator=g) * 3, True),
        "bf16_lead_dims": (torch.randn(2, 8, 256, generator=g).to(torch.bfloat16), False),
        "neg_tiny": (-torch.rand(4, 128, generator=g) * 1e-6 + torch.eye(4, 128) * 1e3, False),
    }
    for name, (x, pow2) in cases.items():
        q, s = T.quantize_act(x, pow2=pow2)
        qr, sr = Q.quantize_act(x, pow2=pow2)
        out[f"quant_code_mismatches/{name}"] = int((q.view(torch.uint8) != qr.view(torch.uint8)).sum())
        out[f"quant_scale_equal/{name}"] = bool(torch.equal(s, sr)) and q.shape == qr.shape and s.shape == sr.shape

    # --- block-scaled GEMM: vs the torch emulation and vs float64 of the dequantized operands ---
    shapes = {"m32_n256_k256": (32, 256, 256), "m7_n130_k200": (7, 130, 200), "m4_n16_k256": (4, 16, 256)}
    for name, (M, N, K) in shapes.items():
        xq, xs = Q.quantize_act(torch.randn(M, K, generator=g))
        w = torch.randn(N, K, generator=g)
        for layout in ("blocks", "rows"):
            wq, ws = Q.quantize_weight(w) if layout == "blocks" else Q.quantize_act(w)
            w64 = (Q.dequantize_weight(wq, ws, dtype=torch.float64) if layout == "blocks"
                   else Q.dequantize_act(wq, ws, dtype=torch.float64))
            o = T.fp8_gemm(xq, xs, wq, ws)
            out[f"gemm_vs_torch/{name}/{layout}"] = rel(o, Q.fp8_gemm(xq, xs, wq, ws))
            out[f"gemm_vs_f64/{name}/{layout}"] = rel(o, Q.dequantize_act(xq, xs, dtype=torch.float64) @ w64.t())
        ob = T.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16)
        out[f"gemm_bf16_out/{name}"] = rel(ob, o) if ob.dtype == torch.bfloat16 else 1.0

    # --- grouped GEMM, one launch for all experts: vs the per-expert torch loop (an empty expert, ragged counts) ---
    counts = [5, 0, 20, 3]
    E, N, K = len(counts), 130, 256
    xq, xs = Q.quantize_act(torch.randn(sum(counts), K, generator=g))
    w = torch.randn(E, N, K, generator=g)
    blocks = [Q.quantize_weight(w[e]) for e in range(E)]
    wq, ws = torch.stack([b[0] for b in blocks]), torch.stack([b[1] for b in blocks])
    out["grouped_gemm/blocks"] = rel(T.fp8_grouped_gemm(xq, xs, wq, ws, counts),
                                     Q.fp8_grouped_gemm(xq, xs, wq, ws, counts))
    wt, wst = wq.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous()  # Dgrad: dY [T, N] @ W_e
    dq, dsc = Q.quantize_act(torch.randn(sum(counts), N, generator=g))
    out["grouped_gemm/dgrad"] = rel(T.fp8_grouped_gemm(dq, dsc, wt, wst, counts),
                                    Q.fp8_grouped_gemm(dq, dsc, wt, wst, counts))
    rows = [Q.quantize_act(w[e]) for e in range(E)]  # 1x128 tiles on the weight side
    rq, rs = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    out["grouped_gemm/rows"] = rel(T.fp8_grouped_gemm(xq, xs, rq, rs, counts),
                                   Q.fp8_grouped_gemm(xq, xs, rq, rs, counts))
    out["grouped_gemm/tiles"] = T.grouped_tiles(counts, 16).tolist()

    # --- Fp8Linear and the grouped experts: triton backend vs torch backend, forward and backward ---
    K, N = 256, 128
    torch.manual_seed(1)
    lin_t = Fp8Linear(K, N, backend="triton")
    lin_r = Fp8Linear(K, N, backend="torch")
    lin_r.load_state_dict(lin_t.state_dict())
    x = torch.randn(16, K, generator=g)
    dy = torch.randn(16, N, generator=g)
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, yr = lin_t(xt), lin_r(xr)
    yt.backward(dy)
    yr.backward(dy)
    out["linear/y"] = rel(yt.detach(), yr.detach())
    out["linear/dx"] = rel(xt.grad, xr.grad)
    out["linear/dw"] = rel(lin_t.weight.grad, lin_r.weight.grad)
    weights = torch.randn(2, N, K, generator=g)
    xs_ = torch.randn(20, K, generator=g)
    res = []
    for backend in ("triton", "torch"):
        w_, x_ = weights.clone().requires_grad_(), xs_.clone().requires_grad_()
        y_ = fp8_grouped_linear(x_, [12, 8], w_, backend=backend)
        y_.backward(torch.ones_like(y_))
        res.append((y_.detach(), x_.grad, w_.grad))
    for i, k in enumerate(("y", "dx", "dw")):
        out[f"grouped/{k}"] = rel(res[0][i], res[1][i])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


def test_quantize_kernel_is_bit_exact(results):
    mismatches = {k: v for k, v in results.items() if k.startswith("quant_code_mismatches/") and v != 0}
    assert not mismatches
    scales = [k for k, v in results.items() if k.startswith("quant_scale_equal/")]
    assert len(scales) == 7 and all(results[k] is True for k in scales)


def test_gemm_kernel_matches_reference(results):
    keys = [k for k in results if k.startswith("gemm_vs_")]
    assert len(keys) == 12
    assert all(results[k] <= 1e-6 for k in keys), {k: results[k] for k in keys}
    # bf16 output = the fp32 result rounded once to nearest: within half a bf16 ulp (2^-8 relative) of it
    assert all(results[f"gemm_bf16_out/{n}"] <= 2.0 ** -8 for n in ("m32_n256_k256", "m7_n130_k200", "m4_n16_k256"))


def test_grouped_gemm_is_one_launch_matching_the_loop(results):
    keys = ["grouped_gemm/blocks", "grouped_gemm/dgrad", "grouped_gemm/rows"]
    assert all(results[k] <= 1e-6 for k in keys), {k: results[k] for k in keys}
    # the launch's tile table: no tile straddles two experts, the empty expert has none
    assert results["grouped_gemm/tiles"] == [[0, 0, 5], [2, 5, 21], [2, 21, 25], [3, 25, 28]]


def test_linear_and_grouped_backends_agree(results):
    keys = ["linear/y", "linear/dx", "linear/dw", "grouped/y", "grouped/dx", "grouped/dw"]
    assert all(results[k] <= 1e-6 for k in keys), {k: results[k] for k in keys}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(_worker()))
