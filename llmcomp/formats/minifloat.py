"""Minifloat element codec and the block-scale encodings of the FP4 formats (pure torch).

A ``Minifloat`` ExMy code is ``[sign | exponent (x bits) | mantissa (y bits)]`` read as an unsigned
integer, sign in the top bit. With exponent field ``E``, mantissa field ``M`` and exponent ``bias``:

    E == 0:  (-1)^s * (M / 2^y)     * 2^(1 - bias)      (zero and subnormals)
    E >  0:  (-1)^s * (1 + M / 2^y) * 2^(E - bias)

Every code is a finite number (no inf/NaN), as in the OCP MX element formats; E2M1 with bias 1 is
FP4: magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}. ``encode`` rounds to the nearest representable value,
ties to the even code (for y ≥ 1 that is IEEE round-half-to-even on the mantissa), and saturates
beyond the largest magnitude. Zero is always encoded with the sign bit clear.

Block scales:
- **E8M0** (OCP MX): a uint8 biased exponent, value 2^(bits - 127); 255 is NaN and never written.
- **E4M3** (NVFP4): ``torch.float8_e4m3fn`` (max 448, subnormals down to 2^-9, no inf), via torch's
  round-to-nearest-even cast after clamping to ±448 (the cast turns larger values into NaN).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError


@functools.lru_cache(maxsize=None)
def _magnitudes(exp_bits: int, man_bits: int, bias: int) -> tuple[float, ...]:
    """Non-negative values in code order (code = E << man_bits | M); strictly increasing."""
    out = []
    for code in range(1 << (exp_bits + man_bits)):
        e, m = code >> man_bits, code & ((1 << man_bits) - 1)
        frac = m / (1 << man_bits)
        out.append(math.ldexp(frac, 1 - bias) if e == 0 else math.ldexp(1 + frac, e - bias))
    return tuple(out)


@register_config
@dataclass(frozen=True)
class Minifloat:
    """Sign + ``exp_bits`` + ``man_bits`` minifloat; ``bias`` defaults to 2^(exp_bits-1) - 1 (IEEE)."""

    exp_bits: int = 2
    man_bits: int = 1
    bias: Optional[int] = None

    VERSION = 1

    def __post_init__(self):
        e, m = self.exp_bits, self.man_bits
        if not isinstance(e, int) or not isinstance(m, int) or e < 0 or m < 0 or e + m < 1 or 1 + e + m > 8:
            raise UserError(f"A minifloat needs exp_bits, man_bits ≥ 0 with 2 to 8 bits in all, got E{e}M{m}.")
        if self.bias is None:
            object.__setattr__(self, "bias", (1 << (e - 1)) - 1 if e else 0)
        if not isinstance(self.bias, int):
            raise UserError(f"exponent bias must be an integer, got {self.bias!r}.")
        mags = _magnitudes(e, m, self.bias)
        if not (2.0 ** -120 <= mags[1] and mags[-1] <= 2.0 ** 120):
            raise UserError(f"exponent bias {self.bias} puts E{e}M{m} outside the float32 range.")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def max_value(self) -> float:
        return _magnitudes(self.exp_bits, self.man_bits, self.bias)[-1]

    @property
    def emax(self) -> int:
        """floor(log2(max_value)): the exponent of the largest normal (2 for E2M1)."""
        return math.frexp(self.max_value)[1] - 1

    def describe(self) -> str:
        standard = self.bias == ((1 << (self.exp_bits - 1)) - 1 if self.exp_bits else 0)
        return f"e{self.exp_bits}m{self.man_bits}" + ("" if standard else f" bias {self.bias}")

    def magnitudes(self, device=None) -> torch.Tensor:
        """float32 [2^(bits-1)]: the non-negative values, indexed by the code without its sign bit."""
        return torch.tensor(_magnitudes(self.exp_bits, self.man_bits, self.bias), dtype=torch.float32, device=device)

    def values(self, device=None) -> torch.Tensor:
        """float32 [2^bits]: the value of every code (codes with the sign bit set are negated)."""
        mags = self.magnitudes(device)
        return torch.cat([mags, -mags])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (any shape, float) → uint8 codes: round to nearest, ties to the even code, saturating."""
        mags = self.magnitudes(x.device)
        # midpoints of adjacent magnitudes need one more mantissa bit: exact in float32
        mid = (mags[:-1] + mags[1:]) / 2
        a = x.float().abs().contiguous()
        lo = torch.searchsorted(mid, a, right=False)  # a ≤ mid[lo]
        hi = torch.searchsorted(mid, a, right=True)   # a < mid[hi]; hi == lo + 1 exactly at a tie
        mag = torch.where(lo == hi, lo, lo + (lo & 1))
        sign = (x < 0) & (mag != 0)
        return (mag | (sign.to(mag.dtype) << (self.bits - 1))).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes → float32 values (same shape)."""
        return self.values(codes.device)[codes.long()]


E2M1 = Minifloat(2, 1, 1)  # FP4 (OCP MX spec): ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}


# -- E8M0 (OCP MX shared scale) ------------------------------------------------------------------
E8M0_BIAS = 127
E8M0_NAN = 255


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2(x)) as int32 for finite x > 0 (subnormals included); ``torch.log2`` can round
    up just below a power of two. Undefined for x == 0."""
    return torch.frexp(x.float())[1] - 1


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """Unbiased integer exponents → uint8 E8M0 bits, clamped to the representable [-127, 127]."""
    return (exponent.to(torch.int32).clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(bits: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 bits → float32 2^(bits - 127) (2^-127 is a float32 subnormal, exact); 255 → NaN."""
    scale = torch.exp2(bits.float() - E8M0_BIAS)
    return torch.where(bits == E8M0_NAN, torch.full_like(scale, float("nan")), scale)


# -- E4M3 (NVFP4 block scale) --------------------------------------------------------------------
E4M3_MAX = 448.0


def e4m3_encode(x: torch.Tensor) -> torch.Tensor:
    """float → float8_e4m3fn, round to nearest even, saturating at ±448."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
