"""Block-scaled E4M3 quantization and the promoted GEMM (framework/fp8/quantize.py) against exact references.

Error bound used throughout (derived, not fitted). Let y = x / s be a value in tile units (|y| <= 448).
E4M3 has 3 mantissa bits: in the binade [2^e, 2^(e+1)) its spacing is 2^(e-3), so round-to-nearest moves y by
at most 2^(e-4) <= 2^-4 |y|; below the smallest normal 2^-6 the spacing is the fixed subnormal step 2^-9, so
the move is at most 2^-10. Multiplying back by s:
    |dequant(x) - x| <= 2^-4 |x| + 2^-10 s
plus fp32 rounding of x / s (relative 2^-24), covered by a (1 + 2^-20) slack. The dequantized value itself is
computed in float64 (q * s is exact there).
"""
import math

import pytest
import torch

from framework.fp8 import quantize as Q

BOUND_REL = 2.0 ** -4
BOUND_SUB = 2.0 ** -10
SLACK = 1 + 2.0 ** -20


def _wide_range(*shape, seed=0):
    """Normal data with per-column magnitudes spread over 1e-6 .. 1e3 (exercises subnormals and big tiles)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-6, 3, shape[-1])


def _check_bound(x, deq64, scale_full):
    x64 = x.double()
    err = (deq64 - x64).abs()
    allowed = (BOUND_REL * x64.abs() + BOUND_SUB * scale_full.double()) * SLACK
    assert bool((err <= allowed).all()), f"max excess {(err - allowed).max().item()}"
    # the bound is tight, not vacuous: some normal-range element comes close to 2^-4 relative error
    normal = x64.abs() >= 2.0 ** -6 * scale_full.double()
    worst = (err[normal] / x64.abs()[normal]).max().item()
    assert 2.0 ** -5 < worst <= BOUND_REL * SLACK


@pytest.mark.parametrize("shape", [(7, 300), (2, 3, 256), (1, 128)])
@pytest.mark.parametrize("pow2", [False, True])
def test_act_error_bound_and_layout(shape, pow2):
    x = _wide_range(*shape)
    q, s = Q.quantize_act(x, pow2=pow2)
    K = shape[-1]
    assert q.dtype == Q.E4M3 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], math.ceil(K / 128))
    deq = Q.dequantize_act(q, s, dtype=torch.float64)
    _check_bound(x, deq, Q.expand_scale(s, x.shape, (1, 128)))
    # online scaling: each tile's amax maps onto 448 exactly (pow2: amax / s in (224, 448], rounded into [224, 448])
    x2, q2 = x.reshape(-1, K), q.reshape(-1, K).float()
    for g in range(s.shape[-1]):
        tile_max = q2[:, g * 128:(g + 1) * 128].abs().amax(-1)
        if pow2:
            assert bool((tile_max >= 224).all()) and bool((tile_max <= 448).all())
        else:
            assert torch.equal(tile_max, torch.full_like(tile_max, 448.0))
    assert torch.equal(x2.abs().amax(-1) > 0, q2.abs().amax(-1) > 0)


@pytest.mark.parametrize("shape", [(256, 384), (130, 300), (3, 200, 129)])
def test_weight_error_bound_and_layout(shape):
    w = _wide_range(*shape, seed=1)
    q, s = Q.quantize_weight(w)
    *lead, N, K = shape
    assert q.shape == w.shape and s.shape == (*lead, math.ceil(N / 128), math.ceil(K / 128))
    deq = Q.dequantize_weight(q, s, dtype=torch.float64)
    _check_bound(w, deq, Q.expand_scale(s, w.shape, (128, 128)))
    # a batched quantization equals quantizing each matrix alone
    if lead:
        for e in range(lead[0]):
            qe, se = Q.quantize_weight(w[e])
            assert torch.equal(qe.view(torch.uint8), q[e].view(torch.uint8)) and torch.equal(se, s[e])


def test_weight_blocks_match_explicit_block_amax():
    w = _wide_range(130, 260, seed=2)
    _, s = Q.quantize_weight(w)
    for i in range(2):
        for j in range(3):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j].item() == pytest.approx(block.abs().max().item() / 448.0, rel=2 ** -23)


def test_cast_rounds_to_nearest_even_on_the_e4m3_grid():
    """A tile with amax 448 has scale exactly 1, so q must be the E4M3 round-to-nearest-even of x itself."""
    codes = torch.arange(0, 127, dtype=torch.uint8)  # all finite positive codes 0x00..0x7E
    grid = codes.view(Q.E4M3).double()  # ascending, 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    step = grid[1:] - grid[:-1]
    probes = torch.cat([grid, mids, mids + step / 64, mids - step / 64])  # ties and just off them
    probes = torch.cat([probes, -probes])  # 1012 values
    probes = torch.cat([probes, torch.zeros(-probes.numel() % 128, dtype=torch.float64)])
    tiles = probes.view(-1, 128)
    tiles[:, 0] = 448.0  # every tile: amax 448 -> scale 1
    x = tiles.float()
    assert torch.equal(x.double(), tiles)  # every probe is exact in fp32
    q, s = Q.quantize_act(x.view(1, -1))
    assert torch.equal(s, torch.ones_like(s))
    # expected: nearest grid value, ties to the even code (codes count mantissa steps)
    mag = tiles.abs().reshape(-1, 1)
    dist = (mag - grid.view(1, -1)).abs()
    best = dist.min(-1, keepdim=True).values
    cand = (dist == best) & ((codes.view(1, -1) % 2 == 0) | ((dist == best).sum(-1, keepdim=True) == 1))
    expected = grid[cand.float().argmax(-1)] * tiles.reshape(-1).sign()
    assert torch.equal(q.double().view(-1), expected)


def test_pow2_scales_are_powers_of_two_and_never_saturate():
    x = _wide_range(16, 512, seed=3) * 7.3
    _, s_plain = Q.quantize_act(x)
    q, s = Q.quantize_act(x, pow2=True)
    mantissa, _ = torch.frexp(s)
    assert bool((mantissa == 0.5).all())  # exact powers of two
    # the smallest power of two >= the plain scale: s / 2 < s_plain <= s
    assert bool((s >= s_plain).all()) and bool((s / 2 < s_plain).all())
    tiles = x.view(16, 4, 128)
    assert bool(((tiles.abs() / s.unsqueeze(-1)) <= 448).all())  # nothing reaches past the format
    assert bool((q.float().abs() <= 448).all())
    # exact powers and their neighbours
    v = torch.tensor([1.0, 2.0 ** -20, 3.0, 0.75, 1.0000001, 2.0 ** 10 - 1e-4, 448.0 / 448.0])
    expected = torch.tensor([2.0 ** math.ceil(math.log2(t)) for t in v.double().tolist()], dtype=torch.float32)
    assert torch.equal(Q.round_up_pow2(v), expected)


def test_zero_tiles_are_finite_and_exact():
    x = torch.randn(3, 384)
    x[1] = 0.0  # a whole zero row
    x[0, 128:256] = 0.0  # one zero tile
    for pow2 in (False, True):
        q, s = Q.quantize_act(x, pow2=pow2)
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
        deq = Q.dequantize_act(q, s)
        assert bool(torch.isfinite(deq).all())
        assert torch.equal(deq[1], torch.zeros(384)) and torch.equal(deq[0, 128:256], torch.zeros(128))
    qw, sw = Q.quantize_weight(torch.zeros(130, 140))
    assert bool(torch.isfinite(sw).all()) and torch.equal(Q.dequantize_weight(qw, sw), torch.zeros(130, 140))


def test_padding_equals_explicit_zero_padding():
    x = _wide_range(5, 200, seed=4)
    q, s = Q.quantize_act(x)
    qp, sp = Q.quantize_act(torch.nn.functional.pad(x, (0, 56)))
    assert torch.equal(q.view(torch.uint8), qp[:, :200].view(torch.uint8)) and torch.equal(s, sp)
    assert torch.equal(qp[:, 200:].float(), torch.zeros(5, 56))
    w = _wide_range(130, 200, seed=5)
    qw, sw = Q.quantize_weight(w)
    qwp, swp = Q.quantize_weight(torch.nn.functional.pad(w, (0, 56, 0, 126)))
    assert torch.equal(qw.view(torch.uint8), qwp[:130, :200].view(torch.uint8)) and torch.equal(sw, swp)


def test_transposed_tiles_run_along_tokens():
    x = _wide_range(300, 64, seed=6)  # 300 tokens, 64 features
    q, s = Q.quantize_act_transposed(x)
    assert q.shape == (64, 300) and s.shape == (64, 3)
    qr, sr = Q.quantize_act(x.t().contiguous())
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    # scale [k, j] is the amax of column k over tokens 128j .. 128j+127
    assert s[5, 1].item() == pytest.approx(x[128:256, 5].abs().max().item() / 448, rel=2 ** -23)


@pytest.mark.parametrize("M,N,K", [(33, 130, 200), (64, 256, 512), (1, 1, 5)])
@pytest.mark.parametrize("row_scales", [False, True])
def test_fp8_gemm_matches_float64_of_dequantized_operands(M, N, K, row_scales):
    x, w = _wide_range(M, K, seed=7), torch.randn(N, K)
    xq, xs = Q.quantize_act(x)
    if row_scales:  # Wgrad layout: the right operand tiled 1x128 per row
        wq, ws = Q.quantize_act(w)
        w64 = Q.dequantize_act(wq, ws, dtype=torch.float64)
    else:
        wq, ws = Q.quantize_weight(w)
        w64 = Q.dequantize_weight(wq, ws, dtype=torch.float64)
    out = Q.fp8_gemm(xq, xs, wq, ws)
    ref = Q.dequantize_act(xq, xs, dtype=torch.float64) @ w64.t()
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    # the same per-group formula written out: sum_g (xq_g wq_g^T) * xs_g * ws_g
    ws_rows = Q.weight_scale_rows(ws, N)
    loop = torch.zeros(M, N, dtype=torch.float64)
    for g in range(math.ceil(K / 128)):
        sl = slice(g * 128, (g + 1) * 128)
        loop += (xq[:, sl].double() @ wq[:, sl].double().t()) * xs[:, g:g + 1].double() * ws_rows[:, g].double()
    assert ((out.double() - loop).abs().max() / loop.abs().max()).item() <= 1e-6
    assert Q.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="block"):
        Q.quantize_act(torch.randn(2, 8), block=0)
    with pytest.raises(ValueError, match="x must be"):
        Q.quantize_act(torch.randn(2, 8).to(Q.E4M3))
    with pytest.raises(ValueError, match="x must be"):
        Q.quantize_act(torch.arange(8))
    xq, xs = Q.quantize_act(torch.randn(4, 256))
    wq, ws = Q.quantize_weight(torch.randn(8, 128))
    with pytest.raises(ValueError, match="share K"):
        Q.fp8_gemm(xq, xs, wq, ws)
    wq, ws = Q.quantize_weight(torch.randn(300, 256))
    with pytest.raises(ValueError, match="ws has 2 rows"):
        Q.fp8_gemm(xq, xs, wq, ws[:2])
    with pytest.raises(ValueError, match="xs must have shape"):
        Q.fp8_gemm(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="scale must have shape"):
        Q.dequantize_act(xq, xs[:, :1])
