"""Block-scaled FP8 (E4M3) quantization of DeepSeek-V3 §3.3, written in plain torch.

This is the exact reference ("torch" backend): every other implementation (the triton kernels) is tested
bit-for-bit against it. FP8 values are exactly representable in fp32, so the GEMM is emulated with fp32 math
on any device, CPU included.

Layouts (V3 §3.3.1, fine-grained quantization):
  activations   1x128 tiles along the last (reduction) dim: one fp32 scale per token per 128 channels
  weights       128x128 blocks: one fp32 scale per block
  Wgrad inputs  128x1 tiles (along tokens) = the activation layout applied to the transposed tensor

Scaling is online: each tile's scale is computed from its own amax at every call (no delayed scaling), so a
tile's largest value lands on the format's maximum and nothing saturates.

Shapes whose tiled dims are not multiples of the block are padded with zeros up to the next multiple before
tiling; zeros do not change a tile's amax, and the padding is cut away again, so q always has the shape of the
input while the scales cover ceil(dim / block) tiles.
"""
import math

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite E4M3 value (1.75 * 2^8); "fn" = no infinities, so the cast saturates here
BLOCK = 128  # tile edge of V3 §3.3.1, also the N_C = 128 promotion interval of §3.3.2
AMAX_EPS = 1e-12  # floor on a tile's amax: an all-zero tile gets a tiny finite scale instead of 0 (-> 0/0 = NaN)


def _check_block(block):
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")


def _check_float(name, t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (E4M3, torch.float8_e5m2):
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float32/bfloat16/float16/float64 tensor, got {got}")


def _pad_dim(x, dim, block):
    """Zero-pad dimension `dim` of x up to a multiple of `block` (no copy when already a multiple)."""
    size = x.shape[dim]
    extra = -size % block
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, extra]
    return F.pad(x, pad)


def round_up_pow2(s):
    """Smallest power of two >= s, for positive normal fp32 s, exactly (no log2 rounding).

    Adding 2^23 - 1 to the bit pattern carries into the exponent unless the mantissa is already zero;
    masking the mantissa then leaves 2^ceil(log2 s). Used for the ue8m0 (power-of-2) scales of V3 §3.3.
    """
    bits = s.contiguous().view(torch.int32)
    return ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)


def scale_from_amax(amax, pow2=False):
    """Per-tile scale so that amax maps onto E4M3_MAX; fp32 in, fp32 out.

    pow2 rounds the scale UP, so amax / scale <= 448 still holds and nothing saturates.
    """
    scale = amax.float().clamp(min=AMAX_EPS) / E4M3_MAX
    if pow2:
        scale = round_up_pow2(scale)
    return scale


def cast_e4m3(y):
    """Saturating cast of fp32 y (already divided by its scale) to E4M3, rounding to nearest even.

    Clamping first keeps out-of-range values at +-448 (the cast alone would also saturate inf, but we
    want the behaviour explicit and identical in every backend).
    """
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


# ----------------------------------------------------------------------------------------------------------
# activations: 1x128 tiles along the last dim


def quantize_act(x, block=BLOCK, pow2=False):
    """x [..., K] float -> (q E4M3 [..., K], scale fp32 [..., ceil(K/block)]), 1 x block tiles."""
    _check_block(block)
    _check_float("x", x)
    *lead, K = x.shape
    M, G = math.prod(lead), math.ceil(K / block)
    x2 = x.reshape(M, K).float()
    # one (possibly short) tile per row needs no padding: same amax, same values, less work for narrow layers
    tiles = x2.view(M, 1, K) if G == 1 else _pad_dim(x2, 1, block).view(M, G, block)
    scale = scale_from_amax(tiles.abs().amax(dim=-1), pow2)  # [M, G]
    q = cast_e4m3(tiles / scale[..., None])  # [M, G, block] (or [M, 1, K])
    q = q.view(M, q.shape[1] * q.shape[2])[:, :K].contiguous()  # [M, K]: padding cut away
    return q.view(*lead, K), scale.view(*lead, G)


def dequantize_act(q, scale, block=BLOCK, dtype=torch.float32):
    """Inverse of quantize_act: q [..., K], scale [..., G] -> [..., K] in `dtype` (computed in max(fp32, dtype))."""
    _check_block(block)
    *lead, K = q.shape
    G = math.ceil(K / block)
    if tuple(scale.shape) != (*lead, G):
        raise ValueError(f"scale must have shape {(*lead, G)} for q of shape {tuple(q.shape)}, "
                         f"got {tuple(scale.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    M = math.prod(lead)
    q2 = _pad_dim(q.reshape(M, K).to(work), 1, block)  # [M, G*block]
    x = q2.view(M, G, block) * scale.reshape(M, G, 1).to(work)
    return x.view(M, G * block)[:, :K].reshape(*lead, K).to(dtype)


def quantize_act_transposed(x, block=BLOCK, pow2=False):
    """x [M, K] -> quantized x^T: (q [K, M], scale [K, ceil(M/block)]), i.e. block x 1 tiles of x along tokens.

    Wgrad (dW = dY^T X) reduces over tokens, so both of its operands are tiled along the token dim
    (V3 §3.3: the cached activation is re-tiled from 1x128 to 128x1 for the weight gradient).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [tokens, features], got shape {getattr(x, 'shape', None)}")
    return quantize_act(x.t(), block=block, pow2=pow2)


# ----------------------------------------------------------------------------------------------------------
# weights: 128x128 blocks over the last two dims (leading dims, e.g. experts, are batched)


def quantize_weight(w, block=BLOCK, pow2=False):
    """w [..., N, K] float -> (q E4M3 [..., N, K], scale fp32 [..., ceil(N/block), ceil(K/block)])."""
    _check_block(block)
    _check_float("w", w)
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dims [..., N, K], got shape {tuple(w.shape)}")
    *lead, N, K = w.shape
    w3 = w.reshape(-1, N, K).float()  # [B, N, K]
    B = w3.shape[0]
    wp = _pad_dim(_pad_dim(w3, 1, block), 2, block)
    Nb, Kb = wp.shape[1] // block, wp.shape[2] // block
    blocks = wp.view(B, Nb, block, Kb, block)  # [B, Nb, block, Kb, block]
    scale = scale_from_amax(blocks.abs().amax(dim=(2, 4)), pow2)  # [B, Nb, Kb]
    q = cast_e4m3(blocks / scale[:, :, None, :, None])
    q = q.view(B, Nb * block, Kb * block)[:, :N, :K].contiguous()
    return q.view(*lead, N, K), scale.view(*lead, Nb, Kb)


def dequantize_weight(q, scale, block=BLOCK, dtype=torch.float32):
    """Inverse of quantize_weight: q [..., N, K], scale [..., Nb, Kb] -> [..., N, K] in `dtype`."""
    _check_block(block)
    *lead, N, K = q.shape
    Nb, Kb = math.ceil(N / block), math.ceil(K / block)
    if tuple(scale.shape) != (*lead, Nb, Kb):
        raise ValueError(f"scale must have shape {(*lead, Nb, Kb)} for q of shape {tuple(q.shape)}, "
                         f"got {tuple(scale.shape)}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q3 = _pad_dim(_pad_dim(q.reshape(-1, N, K).to(work), 1, block), 2, block)
    B = q3.shape[0]
    w = q3.view(B, Nb, block, Kb, block) * scale.reshape(B, Nb, 1, Kb, 1).to(work)
    return w.view(B, Nb * block, Kb * block)[:, :N, :K].reshape(*lead, N, K).to(dtype)


def expand_scale(scale, shape, tile):
    """Broadcast per-tile scales to one scale per element: scale [..., A, B] -> [..., *shape[-2:]].

    tile = (rows, cols) of one tile, e.g. (1, 128) for activations, (128, 128) for weights.
    """
    rows, cols = tile
    full = scale.repeat_interleave(cols, dim=-1)[..., : shape[-1]]
    if rows > 1:
        full = full.repeat_interleave(rows, dim=-2)[..., : shape[-2], :]
    return full


def weight_scale_rows(ws, N, block=BLOCK):
    """Scales of the right GEMM operand as one row of K-group scales per output row: [N, G].

    Accepts 128x128 block scales [ceil(N/block), G] (a weight) or per-row 1x128 tile scales [N, G] (the
    token-tiled activation in Wgrad). The two only coincide when N == 1, where both readings agree.
    """
    if ws.dim() != 2:
        raise ValueError(f"ws must be 2-D [ceil(N/{block}) or N, G], got shape {tuple(ws.shape)}")
    if ws.shape[0] == N:
        return ws
    if ws.shape[0] == math.ceil(N / block):
        return ws.repeat_interleave(block, dim=0)[:N]
    raise ValueError(f"ws has {ws.shape[0]} rows; for N={N} it must have {math.ceil(N / block)} (128x128 blocks) "
                     f"or {N} (1x{block} tiles)")


# ----------------------------------------------------------------------------------------------------------
# GEMM with FP32 promotion every 128 elements of K


def _check_gemm_operands(xq, xs, wq, ws, block):
    for name, t in (("xq", xq), ("wq", wq)):
        if not isinstance(t, torch.Tensor) or t.dtype != E4M3 or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D {E4M3} tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    M, K = xq.shape
    N, K2 = wq.shape
    if K != K2:
        raise ValueError(f"xq [M, K] and wq [N, K] must share K, got xq {tuple(xq.shape)} and wq {tuple(wq.shape)}")
    G = math.ceil(K / block)
    if tuple(xs.shape) != (M, G):
        raise ValueError(f"xs must have shape {(M, G)} for xq of shape {(M, K)}, got {tuple(xs.shape)}")
    if ws.dim() != 2 or ws.shape[1] != G:
        raise ValueError(f"ws must have {G} columns (K groups of {block}), got shape {tuple(ws.shape)}")
    return M, N, K, G


def fp8_gemm(xq, xs, wq, ws, block=BLOCK, out_dtype=torch.float32):
    """out [M, N] = X @ W^T from E4M3 operands, scales applied per 128-wide K group, summed in fp32.

    xq [M, K] E4M3 with xs [M, G] (1x128 tiles); wq [N, K] E4M3 with ws [ceil(N/128), G] (128x128 blocks)
    or [N, G] (1x128 tiles, for Wgrad). G = ceil(K/128).

    V3 §3.3.2: tensor cores sum only 128 products of K before the partial sum is promoted to fp32, where the
    two scales of that K group are applied. Here each group's partial product is one fp32 matmul of exact
    FP8 values (a batched matmul over groups), then scaled and summed in fp32, the same math.
    """
    M, N, K, G = _check_gemm_operands(xq, xs, wq, ws, block)
    ws_rows = weight_scale_rows(ws, N, block).float()  # [N, G]
    xs = xs.float()
    if G == 1:  # a single K group: its partial sum is one plain matmul (no padding, no batching)
        out = (xq.float() @ wq.float().t()).mul_(xs).mul_(ws_rows.t())  # [M, N] * [M, 1] * [1, N]
        return out.to(out_dtype)
    a = _pad_dim(xq.float(), 1, block).view(M, G, block).transpose(0, 1)  # [G, M, block]
    b = _pad_dim(wq.float(), 1, block).view(N, G, block).permute(1, 2, 0)  # [G, block, N]
    out = torch.zeros(M, N, dtype=torch.float32, device=xq.device)
    # bound the [groups, M, N] partial-product buffer to ~64 MB
    chunk = max(1, (1 << 24) // max(1, M * N))
    for g0 in range(0, G, chunk):
        g1 = min(G, g0 + chunk)
        part = torch.bmm(a[g0:g1], b[g0:g1])  # [g, M, N]: one promoted partial sum per K group
        part.mul_(xs[:, g0:g1].t().unsqueeze(2)).mul_(ws_rows[:, g0:g1].t().unsqueeze(1))
        out += part.sum(dim=0)
    return out.to(out_dtype)


def fp8_grouped_gemm(xq, xs, wq, ws, counts, block=BLOCK, out_dtype=torch.float32):
    """out [T, N]: rows [start_e, start_e + counts[e]) of X times W_e^T, for every expert e (the reference).

    xq [T, K] E4M3 with xs [T, G] (1x128 tiles, tokens sorted by expert); wq [E, N, K] E4M3 with ws [E, Nb, G]
    (128x128 blocks) or [E, N, G] (1x128 tiles); counts: E host ints summing to T. One fp8_gemm per expert.
    """
    counts = [int(c) for c in counts]
    if wq.dim() != 3 or ws.dim() != 3 or len(counts) != wq.shape[0] or sum(counts) != xq.shape[0]:
        raise ValueError(f"fp8_grouped_gemm: wq [E, N, K], ws [E, *, G] and {xq.shape[0]} rows in counts of E "
                         f"experts, got wq {tuple(wq.shape)}, ws {tuple(ws.shape)}, counts {counts}")
    out = torch.zeros(xq.shape[0], wq.shape[1], dtype=torch.float32, device=xq.device)
    start = 0
    for e, c in enumerate(counts):
        if c:
            out[start:start + c] = fp8_gemm(xq[start:start + c], xs[start:start + c], wq[e], ws[e], block)
        start += c
    return out.to(out_dtype)
