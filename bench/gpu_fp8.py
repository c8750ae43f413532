"""FP8 kernels on one CUDA GPU: correctness checks, then timings against torch; prints markdown tables.

    python bench/gpu_fp8.py            (bench/gpu.sh wraps it with a time limit and keeps the output)
    TRITON_INTERPRET=1 python bench/gpu_fp8.py --smoke    (every step at 1/32 of the sizes, on CPU when no GPU
                                                           is present: checks the script, its numbers mean nothing)

Checks (exit status 1 if one fails): the triton 1x128 quantization is bit-exact against the torch reference;
the block-scaled GEMM matches float64 products of its own FP8 operands; Fp8Linear's triton and torch backends
agree forward and backward. Timings (median of triton.testing.do_bench): quantization bandwidth against a plain
copy; GEMM TFLOP/s of the triton kernel (a small sweep of tile configs, best one shown) against
torch._scaled_mm with row-wise scales, cuBLAS 1x128/128x128 block scales through torch._scaled_mm where this
torch offers them, and bf16 torch.matmul, at 4096^3 and the MoE expert shapes of V3 (hidden 7168, expert
intermediate 2048; V3 Table 1's configuration); the relative error of each against float64 products of the bf16 inputs.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

T0 = time.time()
FAILURES = []
SMOKE = "--smoke" in sys.argv[1:]


def S(n):
    """A problem size: as given, or 1/32 of it for --smoke."""
    return max(16, n // 32) if SMOKE else n


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def rel_max(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def rel_fro(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench_ms(fn):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def check(name, ok, detail):
    log(f"check {name}: {'ok' if ok else 'FAILED'} ({detail})")
    if not ok:
        FAILURES.append(f"{name}: {detail}")
    return ok


def table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


def attempt(fn):
    """Run fn; on error return the message (a missing torch feature must not stop the other measurements)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def main():
    if not torch.cuda.is_available() and not SMOKE:
        print("bench/gpu_fp8.py: CUDA is not available (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    import triton

    from framework.fp8 import Fp8Linear
    from framework.fp8 import quantize as Q
    from framework.fp8 import triton_kernels as TK

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_properties(dev).name if dev.type == "cuda" else "CPU (smoke run)"
    print(f"## FP8 block-scaled kernels on {name} (torch {torch.__version__}, triton {triton.__version__})")
    torch.manual_seed(0)

    # ---------------------------------------------------------------- correctness
    wide = torch.randn(S(4096), S(7168), device=dev) * torch.logspace(-9, 4, S(7168), device=dev)
    wide[7, :128] = 0.0
    for name, x, pow2 in [("bf16", torch.randn(S(4096), S(7168), device=dev, dtype=torch.bfloat16), False),
                          ("fp32 wide-range", wide, False), ("fp32 wide-range pow2", wide, True),
                          ("bf16 padded pow2", torch.randn(S(1000), S(1000), device=dev).bfloat16(), True)]:
        name = f"{name} {x.shape[0]}x{x.shape[1]}"
        q, s = TK.quantize_act(x, pow2=pow2)
        qr, sr = Q.quantize_act(x, pow2=pow2)
        bad = int((q.view(torch.uint8) != qr.view(torch.uint8)).sum())
        check(f"quantize bit-exact [{name}]", bad == 0 and torch.equal(s, sr),
              f"{bad} code mismatches, scales equal: {torch.equal(s, sr)}")
    del wide
    for M, N, K in [(S(512), S(1024), S(2048)), (S(300), S(520), S(1000))]:
        xq, xs = Q.quantize_act(torch.randn(M, K, device=dev))
        wq, ws = Q.quantize_weight(torch.randn(N, K, device=dev))
        ref = Q.dequantize_act(xq, xs, dtype=torch.float64) @ Q.dequantize_weight(wq, ws, dtype=torch.float64).t()
        err = rel_max(TK.fp8_gemm(xq, xs, wq, ws), ref)
        check(f"gemm vs float64 [{M}x{N}x{K}]", err <= 1e-5, f"max rel err {err:.2e}")
        tq, ts = Q.quantize_act(torch.randn(N, K, device=dev))  # the Wgrad layout: per-row scales
        ref = Q.dequantize_act(xq, xs, dtype=torch.float64) @ Q.dequantize_act(tq, ts, dtype=torch.float64).t()
        err = rel_max(TK.fp8_gemm(xq, xs, tq, ts), ref)
        check(f"gemm row scales vs float64 [{M}x{N}x{K}]", err <= 1e-5, f"max rel err {err:.2e}")
    lin_t = Fp8Linear(S(2048), S(1024), backend="triton", device=dev)
    lin_r = Fp8Linear(S(2048), S(1024), backend="torch", device=dev)
    lin_r.load_state_dict(lin_t.state_dict())
    x = torch.randn(S(1024), S(2048), device=dev)
    dy = torch.randn(S(1024), S(1024), device=dev)
    grads = []
    for lin in (lin_t, lin_r):
        xx = x.clone().requires_grad_()
        y = lin(xx)
        y.backward(dy)
        grads.append((y.detach(), xx.grad, lin.weight.grad))
    for i, k in enumerate(("y", "dx", "dw")):
        err = rel_max(grads[0][i], grads[1][i])
        check(f"Fp8Linear triton vs torch [{k}]", err <= 1e-5, f"max rel err {err:.2e}")
    del lin_t, lin_r, x, dy, grads

    # ---------------------------------------------------------------- quantization bandwidth
    rows = []
    for M, K in [(S(4096), S(7168)), (S(16384), S(7168))]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        G = -(-K // 128)
        moved = M * K * 2 + M * K + M * G * 4  # read bf16, write fp8 + scales
        y = torch.empty_like(x)
        t_copy = bench_ms(lambda: y.copy_(x))
        t_tri = bench_ms(lambda: TK.quantize_act(x))
        t_tri2 = bench_ms(lambda: TK.quantize_act(x, pow2=True))
        t_ref = bench_ms(lambda: Q.quantize_act(x))
        gbs = lambda nbytes, ms: f"{nbytes / ms / 1e6:.0f}"  # noqa: E731
        rows.append([f"{M}x{K}", f"{t_tri * 1e3:.0f}", gbs(moved, t_tri), gbs(moved, t_tri2),
                     f"{t_ref * 1e3:.0f}", gbs(2 * M * K * 2, t_copy)])
        log(f"quantize {M}x{K} done")
    table("1x128 quantization, bf16 in (GB/s = bytes read + written / time)",
          ["shape", "triton us", "triton GB/s", "triton pow2 GB/s", "torch reference us", "bf16 copy GB/s"], rows)

    # ---------------------------------------------------------------- GEMM throughput and error
    configs = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4)]
    rows = []
    for M, N, K in [(S(4096), S(4096), S(4096)), (S(4096), S(2048), S(7168)), (S(4096), S(7168), S(2048))]:
        flop = 2 * M * N * K
        tflops = lambda ms: f"{flop / ms / 1e9:.0f}"  # noqa: E731
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        exact = x.double() @ w.double().t()
        xq, xs = TK.quantize_act(x)
        wq, ws = Q.quantize_weight(w)

        best = None
        for bm, bn, nw, ns in configs:
            def run(bm=bm, bn=bn, nw=nw, ns=ns):
                return TK.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16, block_m=bm, block_n=bn,
                                   num_warps=nw, num_stages=ns)
            try:
                run()
                ms = bench_ms(run)
            except Exception as e:  # noqa: BLE001 - an unsupported tile config is skipped
                log(f"config {bm}x{bn} w{nw} s{ns} failed: {type(e).__name__}: {str(e)[:100]}")
                continue
            if best is None or ms < best[0]:
                best = (ms, f"{bm}x{bn} w{nw} s{ns}", run)
        if best is None:
            check(f"gemm compiles [{M}x{N}x{K}]", False, "no tile config ran")
            continue
        ours = best[2]()
        ours_err = rel_fro(ours, exact)

        def rowwise(fast):
            xr_s = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0  # [M, 1]
            wr_s = w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448.0  # [N, 1]
            xr_q = (x.float() / xr_s).clamp(-448, 448).to(torch.float8_e4m3fn)
            wr_q = (w.float() / wr_s).clamp(-448, 448).to(torch.float8_e4m3fn)
            fn = lambda: torch._scaled_mm(xr_q, wr_q.t(), scale_a=xr_s, scale_b=wr_s.t().contiguous(),  # noqa: E731
                                          out_dtype=torch.bfloat16, use_fast_accum=fast)
            out = fn()
            return f"{tflops(bench_ms(fn))} / {rel_fro(out, exact):.4f}"

        def blockwise():
            # cuBLAS block scaling: 1x128 scales of A and 128x128 of B, both stored outer-dim-major
            sa = xs.t().contiguous().t()  # [M, G], stride (1, M)
            sb = ws.contiguous().t()  # [G, N/128]
            fn = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
            out = fn()
            agree = rel_max(out, ours)
            return f"{tflops(bench_ms(fn))} / {rel_fro(out, exact):.4f} (vs ours {agree:.1e})"

        wt = w.t()
        t_bf16 = bench_ms(lambda: torch.matmul(x, wt))
        bf16_err = rel_fro(torch.matmul(x, wt), exact)
        rows.append([f"{M}x{N}x{K}", f"{tflops(best[0])} / {ours_err:.4f}", best[1], attempt(lambda: rowwise(False)),
                     attempt(lambda: rowwise(True)), attempt(blockwise), f"{tflops(t_bf16)} / {bf16_err:.4f}"])
        log(f"gemm {M}x{N}x{K} done")
        del x, w, exact, xq, wq, ours
        torch.cuda.empty_cache()
    table("GEMM, bf16 output: TFLOP/s / relative Frobenius error against float64 products of the bf16 inputs",
          ["M x N x K", "triton 1x128*128x128", "best tile", "_scaled_mm row-wise", "row-wise fast-accum",
           "_scaled_mm 1x128*128x128 (cuBLAS)", "bf16 matmul"], rows)

    # ---------------------------------------------------------------- a whole layer, forward + backward
    rows = []
    for M, K, N in [(S(4096), S(7168), S(2048)), (S(4096), S(2048), S(7168))]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        fp8 = Fp8Linear(K, N, bias=False, backend="triton", track_stats=False, device=dev, dtype=torch.bfloat16)
        ref = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)

        def step(layer):
            def fn():
                layer.weight.grad = None
                x.grad = None
                layer(x).backward(dy)
            return fn
        t_fp8, t_ref = bench_ms(step(fp8)), bench_ms(step(ref))
        flop = 6 * M * N * K
        rows.append([f"{M}x{K} -> {N}", f"{t_fp8:.2f}", f"{flop / t_fp8 / 1e9:.0f}", f"{t_ref:.2f}",
                     f"{flop / t_ref / 1e9:.0f}"])
        log(f"layer {M}x{K}->{N} done")
    table("Linear layer forward + backward (3 GEMMs, quantization, re-tiling included)",
          ["tokens x in -> out", "Fp8Linear triton ms", "TFLOP/s", "nn.Linear bf16 ms", "TFLOP/s"], rows)

    # ---------------------------------------------------------------- MoE experts: one launch vs a loop of launches
    rows = []
    E, K, N = 8, S(7168), S(2048)  # 8 local experts of V3's shape (hidden 7168 -> expert intermediate 2048)
    for tokens in (S(8192), S(32768)):
        counts = torch.multinomial(torch.ones(E), tokens, replacement=True).bincount(minlength=E).tolist()
        xq, xs = TK.quantize_act(torch.randn(tokens, K, device=dev))
        blocks = [Q.quantize_weight(torch.randn(N, K, device=dev)) for _ in range(E)]
        wq, ws = torch.stack([b[0] for b in blocks]), torch.stack([b[1] for b in blocks])
        one = TK.fp8_grouped_gemm(xq, xs, wq, ws, counts)
        ref = Q.fp8_grouped_gemm(xq, xs, wq, ws, counts)
        check(f"grouped GEMM {tokens} tokens", rel_max(one, ref) <= 1e-5, f"rel. max error {rel_max(one, ref):.1e}")

        def loop():
            start = 0
            for e, c in enumerate(counts):
                TK.fp8_gemm(xq[start:start + c], xs[start:start + c], wq[e], ws[e])
                start += c
        t_one = bench_ms(lambda: TK.fp8_grouped_gemm(xq, xs, wq, ws, counts))
        t_loop = bench_ms(loop)
        flop = 2 * tokens * N * K
        rows.append([f"{E} x ({tokens // E} x {K} -> {N})", f"{t_one:.2f}", f"{flop / t_one / 1e9:.0f}",
                     f"{t_loop:.2f}", f"{flop / t_loop / 1e9:.0f}"])
        log(f"grouped {tokens} done")
    table("FP8 expert GEMMs: one grouped launch vs one launch per expert (forward)",
          ["experts x (tokens x in -> out)", "grouped ms", "TFLOP/s", "per-expert loop ms", "TFLOP/s"], rows)

    print(f"\nchecks: {'all passed' if not FAILURES else 'FAILED: ' + '; '.join(FAILURES)}; "
          f"total {time.time() - T0:.0f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
