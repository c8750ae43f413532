"""FP8 block-scaled training numerics of DeepSeek-V3 §3.3: quantization, FP8 linear layers and MoE experts, triton
kernels, the emulated-bf16 baseline, per-step FP8 metrics and saved-activation accounting."""
from .linear import (
    DEFAULT_EXCLUDE,
    Fp8ExpertGemms,
    Fp8GroupedLinearFunction,
    Fp8Linear,
    Fp8LinearFunction,
    Fp8Stats,
    QuantStats,
    collect_fp8_stats,
    convert_to_fp8,
    fp8_grouped_linear,
    fp8_linear,
    iter_fp8_stats,
    resolve_backend,
)
from .bf16_emulation import Bf16ExpertGemms, bf16_grouped, convert_to_bf16_emulation
from .memory import SavedBytes, saved_tensor_bytes
from .metrics import fp8_metrics
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
