"""Block-scaled 4-bit float formats: ``mxfp4``, ``nvfp4`` and ``fp4``.

    w[o, i] ≈ decode(code[o, i]) * S[o, b(i)],   b(i) = i // block

``decode`` is a 4-bit minifloat (E2M1 for MX/NV, see minifloat.py) and ``S`` the block's scale:

- ``mxfp4`` (OCP Microscaling spec v1.0): blocks of 32, ``S = 2^(e - 127)`` with ``e`` a uint8
  E8M0 exponent. Scale rule: shared_exp = floor(log2(amax)) - emax_elem (emax_elem = 2 for E2M1),
  then elements are rounded to nearest even with saturation to ±6 (block values in (6, 8)·2^shared_exp
  saturate, as the spec prescribes).
- ``nvfp4`` (NVIDIA; TensorRT-Model-Optimizer's NVFP4QTensor): blocks of 16, ``S = s_b * g`` with
  ``s_b`` float8_e4m3fn per block and one float32 tensor scale ``g = amax(|W|) / (6 * 448)``;
  ``s_b = e4m3(amax_block / (6 * g))``. ``g`` is stored as the multiplier (modelopt's
  ``weight_scale_2``); compressed-tensors stores its reciprocal as ``weight_global_scale``.
- ``fp4``: any 4-bit minifloat (default E2M1) with a float16 scale ``amax_group / max_value`` per
  ``group_size`` inputs (0 = one per row). The extension point for per-layer element formats
  (E1M2/E3M0 with a searched bias) such as LLM-FP4.

Tensors for a layer of ``out × in`` (``nb = in / block``):
- ``weight_packed``       uint8 [out, packed_len(in, 4)] (in/2 when 8 | in) — codes, two a byte, low nibble
  first (bitpack.pack_bits)
- ``weight_scale``        [out, nb] — uint8 E8M0 bits (mxfp4), float8_e4m3fn (nvfp4), float16 (fp4)
- ``weight_global_scale`` float32 [1] — nvfp4 only
mxfp4/nvfp4 take ``block_size`` (default: the spec's; others are for experiments and ``describe``
says so); their block must divide ``in`` (``validate_shape`` says so); ``fp4``, like ``uniform``,
allows a shorter (ragged) last group: nb = ceil(in / group_size).

Each format exposes the grid math a quantizer needs: ``scales(w)`` picks the stored scale fields of a
[rows, in] weight per its spec, ``block_scale(fields)`` turns them into float32 multipliers and
``encode(w, S)`` rounds onto the grid. RTN is ``quant/fp4.py``; a GPTQ with an FP4 grid reuses the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.bitpack import pack_bits, packed_len, unpack_bits
from llmcomp.formats.minifloat import (E2M1, E4M3_MAX, Minifloat, e4m3_encode, e8m0_decode, e8m0_encode,
                                       floor_log2)

FP4_FORMATS = ("mxfp4", "nvfp4", "fp4")  # names the CLI's --format accepts


class BlockFP(WeightFormat):
    """Shared geometry, storage and reference dequantize of the block-scaled float formats."""

    SCALE_DTYPE: ClassVar[torch.dtype]
    RAGGED: ClassVar[bool] = False  # whether a shorter last block is allowed (the MX/NV specs: no)
    element: Minifloat = E2M1  # a dataclass field in ``fp4``; fixed for mxfp4/nvfp4

    def block(self, in_features: int) -> int:
        raise NotImplementedError

    def n_blocks(self, in_features: int) -> int:
        return -(-in_features // self.block(in_features))

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        b = self.block(in_features)
        if in_features % b and not self.RAGGED:
            raise UserError(f"{layer}: {self.describe()} needs the input dimension to be a multiple of its block "
                            f"size {b}, got {in_features}; add the layer to --ignore or choose another format.")

    def expand(self, per_block: torch.Tensor, in_features: int) -> torch.Tensor:
        """[rows, nb] → [rows, in] by repeating each block's value over its columns."""
        return per_block.repeat_interleave(self.block(in_features), dim=1)[:, :in_features]

    def blocks(self, w: torch.Tensor) -> torch.Tensor:
        """[rows, in] → float32 [rows, nb, block]; a ragged last block (fp4 only) is zero-padded,
        which leaves its amax unchanged."""
        b = self.block(w.shape[1])
        w = torch.nn.functional.pad(w.float(), (0, (-w.shape[1]) % b))
        return w.reshape(w.shape[0], -1, b)

    # -- grid math --------------------------------------------------------------------------
    def scales(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored scale fields (``scale`` [rows, nb], ...) for weight ``w`` [rows, in], per the spec."""
        raise NotImplementedError

    def block_scale(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scale fields → float32 [rows, nb] multipliers S."""
        raise NotImplementedError

    def scale_parts(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 [rows, nb] block multipliers as stored, float32 [1] tensor factor): S = their product, as
        ``block_scale`` computes it (the CUDA kernel stores the first as bytes where they allow it)."""
        s = self.block_scale(fields)
        return s, torch.ones(1, dtype=torch.float32, device=s.device)

    def encode(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of ``w`` given a broadcastable float32 multiplier; a zero scale gives code 0."""
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return self.element.encode(torch.where(scale > 0, w.float() / safe, torch.zeros_like(safe)))

    # -- storage ----------------------------------------------------------------------------
    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        return {
            "weight_packed": TensorSpec((out_features, packed_len(in_features, 4)), torch.uint8),
            "weight_scale": TensorSpec((out_features, self.n_blocks(in_features)), self.SCALE_DTYPE),
        }

    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fields: ``codes`` uint8 [out, in] in [0, 16), ``scale`` [out, nb] (+ ``global_scale`` for nvfp4)."""
        codes = fields["codes"]
        if codes.min() < 0 or codes.max() > 15:
            raise ValueError("codes out of range for 4 bits")
        return {"weight_packed": pack_bits(codes.to(torch.uint8), 4),
                "weight_scale": fields["scale"].to(self.SCALE_DTYPE).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        return {"codes": unpack_bits(tensors["weight_packed"], 4, in_features), "scale": tensors["weight_scale"]}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        f = self.unpack(tensors, in_features)
        scale = self.expand(self.block_scale(f), in_features)
        return (self.element.decode(f["codes"]) * scale).to(dtype)


def _check_block(fmt) -> None:
    if not isinstance(fmt.block_size, int) or fmt.block_size < 2 or fmt.block_size % 2:
        raise UserError(f"{fmt.name} block size must be a positive even integer (the spec's is {fmt.SPEC_BLOCK}), "
                        f"got {fmt.block_size}.")


def _off_spec(fmt) -> str:
    return "" if fmt.block_size == fmt.SPEC_BLOCK else f", spec: {fmt.SPEC_BLOCK}"


@FORMATS.register("mxfp4")
@register_config
@dataclass(frozen=True)
class MXFP4(BlockFP):
    """OCP MXFP4: E2M1 elements, one E8M0 (power-of-two) scale per 32 inputs. 4.25 bits/weight."""

    block_size: int = 32

    name = "mxfp4"
    VERSION = 1
    SPEC_BLOCK: ClassVar[int] = 32
    SCALE_DTYPE = torch.uint8

    def __post_init__(self):
        _check_block(self)

    def block(self, in_features: int) -> int:
        return self.block_size

    def describe(self) -> str:
        return f"mxfp4 (e2m1, e8m0 scale per {self.block_size}{_off_spec(self)})"

    def scales(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = self.blocks(w).abs().amax(-1)  # (rows, nb)
        exp = floor_log2(amax) - self.element.emax
        # an all-zero block takes the smallest scale (its codes are 0 whatever the scale)
        exp = torch.where(amax > 0, exp, torch.full_like(exp, -127))
        return {"scale": e8m0_encode(exp)}

    def block_scale(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        return e8m0_decode(fields["scale"])


@FORMATS.register("nvfp4")
@register_config
@dataclass(frozen=True)
class NVFP4(BlockFP):
    """NVIDIA NVFP4: E2M1 elements, an E4M3 scale per 16 inputs times one FP32 tensor scale. 4.5 bits/weight."""

    block_size: int = 16

    name = "nvfp4"
    VERSION = 1
    SPEC_BLOCK: ClassVar[int] = 16
    SCALE_DTYPE = torch.float8_e4m3fn

    def __post_init__(self):
        _check_block(self)

    def block(self, in_features: int) -> int:
        return self.block_size

    def describe(self) -> str:
        return f"nvfp4 (e2m1, e4m3 scale per {self.block_size}{_off_spec(self)}, fp32 tensor scale)"

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        return {**super().param_specs(out_features, in_features),
                "weight_global_scale": TensorSpec((1,), torch.float32)}

    def global_scale(self, w: torch.Tensor) -> torch.Tensor:
        """float32 [1]: amax(|w|) / (6 * 448), so the largest block scale lands on E4M3's max; 1 for w == 0."""
        g = w.float().abs().amax().reshape(1) / (self.element.max_value * E4M3_MAX)
        return torch.where(g > 0, g, torch.ones_like(g))

    def block_scales(self, w: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """float8_e4m3fn [rows, nb]: amax_block / (6 * g) rounded to E4M3 (a zero or tiny block gets 0)."""
        amax = self.blocks(w).abs().amax(-1)
        return e4m3_encode(amax / (self.element.max_value * global_scale))

    def scales(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.global_scale(w)
        return {"scale": self.block_scales(w, g), "global_scale": g}

    def block_scale(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        return fields["scale"].float() * fields["global_scale"].float()

    def scale_parts(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return fields["scale"].float(), fields["global_scale"].float().reshape(1)

    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**super().pack(fields),
                "weight_global_scale": fields["global_scale"].to(torch.float32).reshape(1).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        return {**super().unpack(tensors, in_features), "global_scale": tensors["weight_global_scale"]}


@FORMATS.register("fp4")
@register_config
@dataclass(frozen=True)
class FP4(BlockFP):
    """A 4-bit minifloat ``element`` with a float16 scale per ``group_size`` inputs (0 = per row)."""

    group_size: int = 128
    element: Minifloat = E2M1

    name = "fp4"
    VERSION = 1
    SCALE_DTYPE = torch.float16
    RAGGED = True

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise UserError(f"group size must be 0 (per-channel) or a positive integer, got {self.group_size}.")
        if self.group_size > 1 << 16:  # (each row is padded and expanded to whole groups: 2^30 asked for 256 GiB)
            raise UserError(f"group size must be at most 65536 (0: per-channel), got {self.group_size}.")
        if self.element.bits != 4:
            raise UserError(f"fp4 needs a 4-bit element (E2M1, E1M2, E3M0), got {self.element.describe()}.")

    def block(self, in_features: int) -> int:
        return self.group_size or in_features

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"fp4 {self.element.describe()} {g} (fp16 scale)"

    def scales(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = self.blocks(w).abs().amax(-1)
        return {"scale": (amax / self.element.max_value).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)}

    def block_scale(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        return fields["scale"].float()
