"""How one AdamW moment is stored: fp32, bf16, or block-scaled fp8 (E4M3).

A MomentBuffer holds one moment (exp_avg or exp_avg_sq) for a flat run of values: a bucket of parameters, or this
rank's shard of it under ZeRO-1. The optimizer loads it into fp32, updates it there and stores it back:

  fp32  the values themselves. load() returns the storage, so the update runs in place, as in torch.optim.AdamW.
  bf16  round to nearest even on store (V3 §3.3.3 keeps both moments in BF16).
  fp8   blocks of `block` consecutive values (128: COAT's group; torchao uses 256) share one fp32 scale amax/448 and
        each value is kept as E4M3(value / scale) (V3 §3.3 uses E4M3 for everything): 1 + 4/block bytes per value.
        The second moment is stored as sqrt(v), and nothing of it rounds to zero (see below).

Why sqrt(v), and why block 128: storing v as is flushes its small entries to zero (v spans the square of the
gradient's range) and m / (0 + eps) explodes; sqrt(v) halves the range to the gradient's. Rounding is to
nearest. The study behind these choices, with its command and figures, is docs/OPTIMIZER_STATE.md.
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
