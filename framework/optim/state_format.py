"""How one AdamW moment is stored: fp32, bf16, or block-scaled fp8 (E4M3).

A MomentBuffer holds one moment (exp_avg or exp_avg_sq) for a flat run of values: a bucket of parameters, or this
rank's shard of it under ZeRO-1. The optimizer loads it into fp32, updates it there and stores it back:

  fp32  the values themselves. load() returns the storage, so the update runs in place, as in torch.optim.AdamW.
  bf16  round to nearest even on store (V3 §3.3.3 keeps both moments in BF16).
  fp8   blocks of `block` consecutive values (128: COAT's group; torchao uses 256) share one fp32 scale amax/448 and
        each value is kept as E4M3(value / scale) (V3 §3.3 uses E4M3 for everything): 1 + 4/block bytes per value.
        The second moment is stored as sqrt(v), and nothing of it rounds to zero (see below).

Why sqrt(v) for fp8 (measured with `python bench/optim_state.py --study`; 262,144 values, 300 steps of gradients
g = s * (mu + noise) whose per-element scale s is log-normal with the given spread in decades, 5% of the elements
stop receiving gradient at a random step ("dying", like an expert or a feature that goes unused), beta=(0.9, 0.95),
block 128; the error is ||u_q - u|| / ||u|| of the update u = m_hat / (sqrt(v_hat) + eps) against fp32 states fed
the same gradients, mean over the steps; "worst" is max |u_q - u| / max |u|, over all steps):

  | m / v storage                            | spread 0.5 | 0.5 + dying | 1.0 + dying | worst (1.0 + dying) |
  |------------------------------------------|------------|-------------|-------------|---------------------|
  | bf16 / bf16                              | 0.0041     | 0.0041      | 0.0041      | 0.018               |
  | fp8 / fp8, v as is                       | 35         | 1.5e4       | 1.2e6       | 5.4e8               |
  | fp8 / fp8, v as is, nonzero kept         | 0.074      | 0.074       | 0.51        | 1.03                |
  | fp8 / fp8, sqrt(v), never 0 (this)        | 0.086      | 0.086       | 0.121       | 1.57                |
  | COAT, k per block in [0.1, 8] (both)     | 0.064      | 0.103       | 0.140       | 1.35                |
  | COAT, k per block in [0.5, 8] (both)     | 0.064      | 0.092       | 0.127       | 1.36                |

  v stored as is loses its small entries: v spans the square of the gradient's range, entries below amax * 2^-19
  flush to zero and m / (0 + eps) explodes. Keeping positive entries nonzero (they become the smallest subnormal)
  removes the explosion, but the subnormal grid is so coarse that the error reaches 51% at a one-decade spread.
  sqrt(v) halves the range to that of the gradient, and its error grows gently with the spread. COAT's per-block
  expansion f(x) = sign(x)|x|^k (k stored per block: 2.09 B/param) is 25% better on clean data but 5-20% worse
  once entries decay (one decayed entry widens its block's range, lowers k and coarsens the whole block), and its
  two pow() per value made encode + decode 2.2x slower than sqrt's. So: sqrt(v), never below the smallest
  subnormal, 2 + 8/128 = 2.0625 B/param at block 128 (`--study --block 256`: 0.086 at spread 0.5 but 0.139 at
  1.0 + dying: a wider block spans a wider range, so 128 is the default).
  Rounding is to nearest. A sqrt(v) rounded down in the subnormal range can enlarge a step by up to 1.5x (the
  "worst" column); rounding up there instead measured worst 0.99 but mean 0.149 instead of 0.121. And a value
  whose decay is smaller than half a grid step stops decaying while its block's scale stands still (for sqrt(v),
  every E4M3 value: sqrt(0.95) takes 2.5% off, half a step is at least 3.3%), which errs on the side of a larger v,
  i.e. smaller steps.
  bf16 stochastic rounding was measured and is not offered: 0.0059 vs 0.0041 (nearest) at beta2=0.95, and 0.0108
  vs 0.0088 at beta2=0.999 over 600 steps. (The timing, rounding-up and stochastic-rounding figures come from
  one-off runs of the same study; they are not in the bench.)
"""
from __future__ import annotations

import torch

FORMATS = ("fp32", "bf16", "fp8")
E4M3_MAX = 448.0                      # largest finite float8_e4m3fn; the cast saturates there
E4M3_MIN_SUBNORMAL = 2.0 ** -9        # smallest positive float8_e4m3fn
_SCALE_FLOOR = torch.finfo(torch.float32).tiny  # keeps amax/448 a normal number (no 0/0 on all-zero blocks)
_STORAGE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def check_format(arg: str, value) -> None:
    if value not in FORMATS:
        raise ValueError(f"{arg}={value!r}: allowed {', '.join(FORMATS)}")


def quantize_blocks_(x: torch.Tensor, block: int, codes: torch.Tensor, scale: torch.Tensor,
                     nonneg: bool = False) -> None:
    """fp32 x [n] (n % block == 0) -> codes float8_e4m3fn [n] and scale fp32 [n / block], written in place; x is
    used as scratch (overwritten). Each block is divided by its scale amax/448, so its largest magnitude lands on
    448. nonneg (sqrt(v)): nothing rounds to zero: values under the grid become its smallest subnormal, so v never
    decodes to 0 and m / (sqrt(v) + eps) never turns into m / eps."""
    blocks = x.view(-1, block)                                                    # [n/block, block]
    amax = blocks.amax(dim=1) if nonneg else torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_())
    torch.div(amax, E4M3_MAX, out=scale).clamp_(min=_SCALE_FLOOR)
    blocks.div_(scale[:, None]).clamp_(min=E4M3_MIN_SUBNORMAL if nonneg else -E4M3_MAX, max=E4M3_MAX)
    codes.view(-1, block).copy_(blocks)                                           # round to nearest even


def e4m3_to_float(codes: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """float8_e4m3fn -> fp32 by moving bits (torch's CPU cast is several times slower): the bits s.eeee.mmm placed
    as the bf16 s.0000eeee.mmm0000 are the same number times 2^-120, subnormals included. signed=False skips the
    sign bit (all codes non-negative)."""
    i = codes.view(torch.uint8).to(torch.int16)
    if signed:
        sign = (i & 0x80).bitwise_left_shift_(8)
        i.bitwise_and_(0x7F).bitwise_left_shift_(4).bitwise_or_(sign)
    else:
        i.bitwise_left_shift_(4)
    return i.view(torch.bfloat16).float().mul_(2.0 ** 120)


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """(codes float8_e4m3fn [n], scale fp32 [n / block]) -> fp32 [n]."""
    return e4m3_to_float(codes, signed).view(scale.numel(), -1).mul_(scale[:, None]).view(-1)


def decode(fmt: str, data: torch.Tensor, scale: torch.Tensor | None, sqrt: bool) -> torch.Tensor:
    """Stored values of one moment -> fp32 logical values (same length as data)."""
    if fmt != "fp8":
        return data.reshape(-1).float()
    x = dequantize_blocks(data.reshape(-1), scale, signed=not sqrt)
    return x.mul_(x) if sqrt else x


class MomentBuffer:
    """One AdamW moment for `numel` values, stored in `fmt` ('fp32' | 'bf16' | 'fp8').

    sqrt=True (the second moment) stores sqrt(v) when fmt is 'fp8'; load() and store_() always speak in v."""

    def __init__(self, numel: int, fmt: str, block: int = 128, sqrt: bool = False, device=None):
        check_format("format", fmt)
        if fmt == "fp8" and numel % block:
            raise ValueError(f"numel={numel}: an fp8 moment needs a multiple of block={block}")
        self.numel, self.fmt, self.block, self.sqrt = numel, fmt, block, sqrt
        self.data = torch.zeros(numel, dtype=_STORAGE_DTYPE[fmt], device=device)
        self.scale = torch.zeros(numel // block, device=device) if fmt == "fp8" else None

    @property
    def name(self) -> str:
        """The format with its block size, as reported and compared on load: 'fp32', 'bf16', 'fp8/128'."""
        return f"fp8/{self.block}" if self.fmt == "fp8" else self.fmt

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] if self.scale is None else [self.data, self.scale]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def load(self) -> torch.Tensor:
        """fp32 [numel]. For fp32 this IS the storage: in-place updates land in the state."""
        if self.fmt == "fp32":
            return self.data
        return decode(self.fmt, self.data, self.scale, self.sqrt)

    def store_(self, x: torch.Tensor) -> None:
        """Keep the fp32 values x [numel] (a no-op when x is the fp32 storage itself). x may be overwritten."""
        self.write_(0, x)

    def write_(self, start: int, x: torch.Tensor) -> None:
        """Store fp32 values x into positions [start, start + len(x)) (block-aligned for fp8); x may be overwritten."""
        if x.data_ptr() == self.data.data_ptr() and x.numel() == self.numel:
            return
        end = start + x.numel()
        if self.fmt != "fp8":
            self.data[start:end].copy_(x)  # bf16: round to nearest even
            return
        quantize_blocks_(x.sqrt_() if self.sqrt else x, self.block, self.data[start:end],
                         self.scale[start // self.block:end // self.block], nonneg=self.sqrt)

    def views(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored tensors of positions [start, end) (block-aligned for fp8), as views."""
        if self.scale is None:
            return self.data[start:end], None
        return self.data[start:end], self.scale[start // self.block:end // self.block]
