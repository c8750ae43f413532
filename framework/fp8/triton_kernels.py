"""Triton kernels for the FP8 recipe of DeepSeek-V3 §3.3: 1x128 activation quantization and the block-scaled GEMM.

They compute exactly what framework.fp8.quantize computes (the reference): quantization bit for bit, the GEMM
up to fp32 summation order. They run on CUDA GPUs, and on CPU tensors only under triton's interpreter.

Interpreter: triton decides at `@triton.jit` time, i.e. when THIS module is imported, whether kernels are
compiled or interpreted (triton.knobs.runtime.interpret reads TRITON_INTERPRET). So TRITON_INTERPRET=1 must be
in the environment before `framework.fp8.triton_kernels` is first imported; setting it later has no effect on
these kernels, and asking for them on CPU then raises a ValueError instead of silently using torch.

Interpreter defects that shape this file (none of them applies on GPU):
  - its fp32 -> float8e4nv cast rounds wrongly, so values are rounded to the E4M3 grid with exact fp32/integer
    math first and the cast only re-encodes an already representable value;
  - a bf16 tl.dot is wrong, so inputs are upcast to fp32 before any arithmetic (the FP8 tl.dot is exact);
  - its fp32 -> bf16 store truncates, so interpreted GEMMs write fp32 and round to bf16 in torch.
"""
import math
import os

import torch

from .quantize import AMAX_EPS, BLOCK, E4M3, E4M3_MAX, _check_gemm_operands, _check_float

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # triton is optional: the torch backend covers every device
    HAVE_TRITON = False

# Fixed at import, like the kernels below (see the module docstring).
INTERPRETED = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(device):
    """Raise a ValueError when the triton kernels cannot run on `device`; say what to change."""
    device = torch.device(device)
    if not HAVE_TRITON:
        raise ValueError("fp8 backend='triton' needs the triton package, which is not installed; "
                         "use backend='torch' or 'auto'")
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError("fp8 backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "framework.fp8.triton_kernels is imported; use backend='torch' or 'auto' on CPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fp8 backend='triton' supports cuda (or cpu under TRITON_INTERPRET=1), got device {device}")
    if device.type == "cuda" and not INTERPRETED and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"fp8 backend='triton' needs FP8 tensor cores (compute capability >= 8.9), "
                         f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}; "
                         f"use backend='torch' (exact emulation in fp32)")


def available(device):
    """True when check_device(device) would pass."""
    try:
        check_device(device)
    except ValueError:
        return False
    return True


def _next_pow2(n):
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


if HAVE_TRITON:
    # globals used inside kernels must be constexpr
    _MAX = tl.constexpr(E4M3_MAX)
    _EPS = tl.constexpr(AMAX_EPS)

    @triton.jit
    def _round_to_e4m3_grid(y):
        """Round fp32 y (|y| <= 448) to the nearest E4M3 value, ties to even, exactly; result is fp32.

        E4M3 keeps 3 mantissa bits, so within the binade [2^e, 2^(e+1)) its spacing (ulp) is 2^(e-3); below the
        smallest normal 2^-6 the subnormals keep the spacing 2^-9. Scaling by 1/ulp (a power of two, exact)
        turns the problem into rounding to an integer, done with floor and an explicit tie rule.
        """
        bits = y.to(tl.int32, bitcast=True)
        negative = bits < 0  # sign bit, so that -0.0 and tiny negatives keep their sign like torch's cast
        exp = (bits >> 23) & 0xFF  # biased fp32 exponent of |y|
        exp = tl.maximum(exp, 127 - 6)  # subnormal range: spacing of the 2^-6 binade
        ulp = ((exp - 3) << 23).to(tl.float32, bitcast=True)  # 2^(exp-127-3)
        inv_ulp = ((257 - exp) << 23).to(tl.float32, bitcast=True)  # 2^(130-exp) = 1/ulp, exact
        t = tl.abs(y) * inv_ulp  # in [0, 16): integer part is the E4M3 mantissa (with hidden bit)
        r = tl.floor(t)
        frac = t - r  # exact: t has at most 24 significant bits and r shares its ulp
        odd = (r.to(tl.int32) & 1) == 1
        r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
        mag = r * ulp
        return tl.where(negative, -mag, mag)

    @triton.jit
    def _quantize_act_kernel(x_ptr, q_ptr, s_ptr, M, K, G, stride_xm, stride_qm, stride_sm,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr):
        # one program: BLOCK_M rows x one K group of BLOCK_K columns
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        g = tl.program_id(1)
        cols = g * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), _EPS)  # [BLOCK_M]; padding zeros do not count
        scale = tl.math.div_rn(amax, _MAX)  # IEEE division, like torch (plain `/` may be approximate on GPU)
        if POW2:  # ue8m0: round the scale up to a power of two (same bit trick as quantize.round_up_pow2)
            sbits = scale.to(tl.int32, bitcast=True)
            scale = ((sbits + 0x007FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        y = tl.math.div_rn(x, scale[:, None])
        y = tl.minimum(tl.maximum(y, -_MAX), _MAX)  # saturate
        q = _round_to_e4m3_grid(y).to(tl.float8e4nv)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=mask)
        tl.store(s_ptr + rows * stride_sm + g, scale, mask=row_ok)

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, G,
                         stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                         B_ROWS_PER_SCALE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # C [M, N] = A [M, K] @ B [N, K]^T, A scaled per (row, K group), B per (row // B_ROWS_PER_SCALE, K group)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        a_rows = a_ptr + rm[:, None] * stride_am
        b_rows = b_ptr + rn[:, None] * stride_bn
        a_scale_rows = as_ptr + rm * stride_asm
        b_scale_rows = bs_ptr + (rn // B_ROWS_PER_SCALE) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, G):
            k = g * BLOCK_K + rk
            k_ok = k < K
            a = tl.load(a_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK] fp8
            b = tl.load(b_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, BK] fp8
            partial = tl.dot(a, tl.trans(b))  # fp32 sum of one K group: promoted every N_C = 128 (V3 §3.3.2)
            sa = tl.load(a_scale_rows + g, mask=m_ok, other=0.0)
            sb = tl.load(b_scale_rows + g, mask=n_ok, other=0.0)
            acc += partial * sa[:, None] * sb[None, :]
        c = c_ptr + rm[:, None] * stride_cm + rn[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fp8_grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, tiles_ptr, N, K, G,
                                 stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_bse, stride_bsn,
                                 B_ROWS_PER_SCALE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # One launch for all experts: program (t, n) computes rows [row0, row1) of expert e (tile t of the
        # table built on the host) times W_e^T, so no tile straddles two experts.
        t = tl.program_id(0)
        e = tl.load(tiles_ptr + 3 * t)
        row0 = tl.load(tiles_ptr + 3 * t + 1)
        row1 = tl.load(tiles_ptr + 3 * t + 2)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < row1
        n_ok = rn < N
        a_rows = a_ptr + rm[:, None] * stride_am
        b_rows = b_ptr + e.to(tl.int64) * stride_be + rn[:, None] * stride_bn
        a_scale_rows = as_ptr + rm * stride_asm
        b_scale_rows = bs_ptr + e.to(tl.int64) * stride_bse + (rn // B_ROWS_PER_SCALE) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, G):
            k = g * BLOCK_K + rk
            k_ok = k < K
            a = tl.load(a_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            partial = tl.dot(a, tl.trans(b))  # promoted to fp32 every K group, as in _fp8_gemm_kernel
            sa = tl.load(a_scale_rows + g, mask=m_ok, other=0.0)
            sb = tl.load(b_scale_rows + g, mask=n_ok, other=0.0)
            acc += partial * sa[:, None] * sb[None, :]
        c = c_ptr + rm[:, None] * stride_cm + rn[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quantize_act(x, block=BLOCK, pow2=False, block_m=None):
    """Triton version of quantize.quantize_act: x [..., K] -> (q E4M3 [..., K], scale fp32 [..., ceil(K/block)])."""
    _check_float("x", x)
    check_device(x.device)
    if block not in (16, 32, 64, 128, 256):
        raise ValueError(f"block must be a power of two in [16, 256] for the triton kernels, got {block!r}")
    *lead, K = x.shape
    M = math.prod(lead)
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    G = math.ceil(K / block)
    q = torch.empty(M, K, dtype=E4M3, device=x.device)
    s = torch.empty(M, G, dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        if block_m is None:  # tiny grids under the interpreter (each program costs milliseconds there)
            block_m = 32 if not INTERPRETED else min(32, max(1, _next_pow2(M)))
        grid = (triton.cdiv(M, block_m), G)
        _quantize_act_kernel[grid](x2, q, s, M, K, G, x2.stride(0), q.stride(0), s.stride(0),
                                   BLOCK_M=block_m, BLOCK_K=block, POW2=bool(pow2))
    return q.view(*lead, K), s.view(*lead, G)


def fp8_gemm(xq, xs, wq, ws, block=BLOCK, out_dtype=torch.float32, block_m=None, block_n=None,
             num_warps=None, num_stages=None):
    """Triton version of quantize.fp8_gemm: out [M, N] = X @ W^T, scales applied per K group of `block`.

    ws is [ceil(N/128), G] (128x128 weight blocks) or [N, G] (1x128 tiles of a token-tiled activation).
    """
    M, N, K, G = _check_gemm_operands(xq, xs, wq, ws, block)
    check_device(xq.device)
    if block not in (16, 32, 64, 128, 256):
        raise ValueError(f"block must be a power of two in [16, 256] for the triton kernels, got {block!r}")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    rows_per_scale = 1 if ws.shape[0] == N else block
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    xs = xs.float().contiguous()
    ws = ws.float().contiguous()
    if INTERPRETED and out_dtype != torch.float32:
        # the interpreter's fp32 -> bf16/fp16 cast truncates instead of rounding to nearest: round in torch
        return fp8_gemm(xq, xs, wq, ws, block, torch.float32, block_m, block_n, num_warps, num_stages).to(out_dtype)
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0 or N == 0:
        return out
    if INTERPRETED:  # smallest legal tiles (tl.dot needs >= 16) to keep the interpreted grid cheap
        block_m = block_m or min(128, max(16, _next_pow2(M)))
        block_n = block_n or min(128, max(16, _next_pow2(N)))
    block_m = block_m or 128
    block_n = block_n or 128
    kwargs = {}
    if num_warps is not None:
        kwargs["num_warps"] = num_warps
    if num_stages is not None:
        kwargs["num_stages"] = num_stages
    elif not INTERPRETED:
        kwargs["num_stages"] = 4  # 4 x (128x128 + 128x128) bytes of fp8 tiles = 128 KB shared memory
    if "num_warps" not in kwargs and not INTERPRETED:
        kwargs["num_warps"] = 8
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](xq, wq, out, xs, ws, M, N, K, G,
                           xq.stride(0), wq.stride(0), out.stride(0), xs.stride(0), ws.stride(0),
                           B_ROWS_PER_SCALE=rows_per_scale, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block,
                           **kwargs)
    return out


def grouped_tiles(counts, block_m):
    """[tiles, 3] int32 (expert, first row, end row): each expert's rows cut into tiles of at most block_m."""
    rows, start = [], 0
    for e, c in enumerate(int(c) for c in counts):
        rows += [(e, r, min(r + block_m, start + c)) for r in range(start, start + c, block_m)]
        start += c
    return torch.tensor(rows, dtype=torch.int32).view(-1, 3)


def fp8_grouped_gemm(xq, xs, wq, ws, counts, block=BLOCK, out_dtype=torch.float32, block_m=None, block_n=None):
    """Triton version of quantize.fp8_grouped_gemm: every expert's GEMM in ONE kernel launch.

    xq [T, K] / xs [T, G] (tokens sorted by expert), wq [E, N, K] / ws [E, Nb, G] or [E, N, G], counts: E host
    ints. The tile table (expert, row range) is built on the host from counts, which the caller already has there.
    """
    check_device(xq.device)
    counts = [int(c) for c in counts]
    if (wq.dim() != 3 or ws.dim() != 3 or len(counts) != wq.shape[0] or sum(counts) != xq.shape[0]
            or xq.dtype != E4M3 or wq.dtype != E4M3):
        raise ValueError(f"fp8_grouped_gemm: xq [T, K] and wq [E, N, K] in {E4M3}, ws [E, *, G] and counts of E "
                         f"experts summing to T, got xq {tuple(xq.shape)}, wq {tuple(wq.shape)}, "
                         f"ws {tuple(ws.shape)}, counts {counts}")
    T_, K = xq.shape
    E, N, _ = wq.shape
    G = math.ceil(K / block)
    if INTERPRETED and out_dtype != torch.float32:  # see fp8_gemm: round to bf16/fp16 in torch
        return fp8_grouped_gemm(xq, xs, wq, ws, counts, block, torch.float32, block_m, block_n).to(out_dtype)
    rows_per_scale = 1 if ws.shape[1] == N else block
    xq, wq = xq.contiguous(), wq.contiguous()
    xs, ws = xs.float().contiguous(), ws.float().contiguous()
    out = torch.zeros(T_, N, dtype=out_dtype, device=xq.device)
    if T_ == 0 or N == 0:
        return out
    if INTERPRETED:
        block_m = block_m or min(128, max(16, _next_pow2(max(counts))))
        block_n = block_n or min(128, max(16, _next_pow2(N)))
    block_m, block_n = block_m or 128, block_n or 128
    tiles = grouped_tiles(counts, block_m).to(xq.device)
    kwargs = {} if INTERPRETED else {"num_warps": 8, "num_stages": 4}
    grid = (tiles.shape[0], triton.cdiv(N, block_n))
    _fp8_grouped_gemm_kernel[grid](xq, wq, out, xs, ws, tiles, N, K, G,
                                   xq.stride(0), wq.stride(0), wq.stride(1), out.stride(0), xs.stride(0),
                                   ws.stride(0), ws.stride(1),
                                   B_ROWS_PER_SCALE=rows_per_scale, BLOCK_M=block_m, BLOCK_N=block_n,
                                   BLOCK_K=block, **kwargs)
    return out
