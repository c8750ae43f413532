"""FP8 block-scaled training numerics of DeepSeek-V3 §3.3: quantization, FP8 linear layers, triton kernels."""
from .linear import (
    DEFAULT_EXCLUDE,
    Fp8GroupedLinearFunction,
    Fp8Linear,
    Fp8LinearFunction,
    Fp8Stats,
    QuantStats,
    collect_fp8_stats,
    convert_to_fp8,
    fp8_grouped_linear,
    fp8_linear,
    resolve_backend,
)
from .quantize import (
    BLOCK,
    E4M3,
    E4M3_MAX,
    dequantize_act,
    dequantize_weight,
    fp8_gemm,
    quantize_act,
    quantize_act_transposed,
    quantize_weight,
)
