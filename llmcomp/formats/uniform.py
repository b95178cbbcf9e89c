"""``uniform``: integer codes on a uniform grid with a float scale and zero per group.

    w[o, i] ≈ (q[o, i] - z[o, g(i)]) * s[o, g(i)],   g(i) = i // group_size

Tensors (for a layer of ``out × in``):
- ``weight_packed`` uint8 [out, packed_len(in, bits)] — codes, bit-packed along ``in`` (bitpack.py)
- ``weight_scale``  float16 [out, n_groups]
- ``weight_zero``   float16 [out, n_groups] — asymmetric only; symmetric uses z = 2**(bits-1)

``group_size=0`` means per-channel (one group per output row). When ``in`` is not a multiple of
``group_size`` the **last group is ragged** (shorter): n_groups = ceil(in / group_size). No padding is
stored. (SmolLM2's 576-wide layers at group 128 get groups of 128,128,128,128,64.)
Zeros are stored as floats so methods that solve a real-valued zero (decoupleQ) use the same format;
RTN and GPTQ store integer-valued zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.bitpack import pack_bits, packed_len, unpack_bits

SCALE_DTYPE = torch.float16


@FORMATS.register("uniform")
@register_config
@dataclass(frozen=True)
class Uniform(WeightFormat):
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    name = "uniform"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(f"bits must be an integer from 2 to 8, got {self.bits}.")
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise UserError(f"group size must be 0 (per-channel) or a positive integer, got {self.group_size}.")
        if self.group_size and self.group_size % 8:
            raise UserError(f"group size must be a multiple of 8 (or 0 for per-channel), got {self.group_size}.")
        if self.group_size > 1 << 16:  # (a layer is padded to whole groups: a huge one would allocate that much)
            raise UserError(f"group size must be at most 65536 (0: per-channel), got {self.group_size}.")

    # -- geometry ---------------------------------------------------------------------------
    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def n_groups(self, in_features: int) -> int:
        g = self.group(in_features)
        return (in_features + g - 1) // g

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        ng = self.n_groups(in_features)
        specs = {
            "weight_packed": TensorSpec((out_features, packed_len(in_features, self.bits)), torch.uint8),
            "weight_scale": TensorSpec((out_features, ng), SCALE_DTYPE),
        }
        if not self.symmetric:
            specs["weight_zero"] = TensorSpec((out_features, ng), SCALE_DTYPE)
        return specs

    # -- grid math shared by every uniform quantizer ----------------------------------------
    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min/max scale and zero for each row of ``w`` [rows, n] (one group per row).

        Returns (scale, zero) as float32 [rows], already rounded to their storage dtype so codes are
        computed against exactly what will be stored.
        """
        w = w.float()
        if self.symmetric:
            amax = w.abs().amax(dim=1)
            scale = 2 * amax / self.maxq
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        else:
            lo = w.amin(dim=1).clamp(max=0)
            hi = w.amax(dim=1).clamp(min=0)
            scale = (hi - lo) / self.maxq
            scale = scale.clamp(min=1e-6).to(SCALE_DTYPE).float()
            zero = torch.round(-lo / scale).clamp(0, self.maxq)
        scale = scale.clamp(min=1e-6).to(SCALE_DTYPE).float()
        return scale, zero

    def encode(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Round ``w`` to codes given broadcastable scale/zero (float32). Returns float codes."""
        return torch.clamp(torch.round(w / scale + zero), 0, self.maxq)

    def expand(self, per_group: torch.Tensor, in_features: int) -> torch.Tensor:
        """[out, n_groups] → [out, in] by repeating each group's value over its columns."""
        g = self.group(in_features)
        return per_group.repeat_interleave(g, dim=1)[:, :in_features]

    # -- storage ----------------------------------------------------------------------------
    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fields: ``codes`` int [out, in], ``scale`` [out, n_groups], ``zero`` [out, n_groups] (asym)."""
        codes = fields["codes"]
        if codes.min() < 0 or codes.max() > self.maxq:
            raise ValueError(f"codes out of range for {self.bits} bits")
        out = {
            "weight_packed": pack_bits(codes.to(torch.uint8), self.bits),
            "weight_scale": fields["scale"].to(SCALE_DTYPE).contiguous(),
        }
        if not self.symmetric:
            out["weight_zero"] = fields["zero"].to(SCALE_DTYPE).contiguous()
        return out

    def zero_points(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The zero point of each group [out, n_groups]: stored (asymmetric) or 2**(bits-1) (symmetric)."""
        if self.symmetric:
            return torch.full_like(tensors["weight_scale"], float(1 << (self.bits - 1)))
        return tensors["weight_zero"]

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        return {"codes": unpack_bits(tensors["weight_packed"], self.bits, in_features),
                "scale": tensors["weight_scale"], "zero": self.zero_points(tensors)}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        f = self.unpack(tensors, in_features)
        scale = self.expand(f["scale"].float(), in_features)
        zero = self.expand(f["zero"].float(), in_features)
        return ((f["codes"].float() - zero) * scale).to(dtype)
