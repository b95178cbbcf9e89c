"""Round-to-nearest into the block-scaled float formats (``mxfp4``, ``nvfp4``, ``fp4``).

Each block's scale follows its format's spec (``fmt.scales``: E8M0 floor(log2 amax) - 2 for MX,
E4M3 amax/6 over an FP32 tensor scale for NV, float16 amax/max for fp4); elements are then rounded to
nearest even on the minifloat grid with saturation (``fmt.encode``). A GPTQ or searched variant
reuses ``fp4_fields``' pieces with its own weights or scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats.fp4 import MXFP4, BlockFP
from llmcomp.quant.base import METHODS, LayerResult, QuantConfig, Quantizer


@register_config
@dataclass(frozen=True)
class FP4Config(QuantConfig):
    format: BlockFP = MXFP4()

    method = "fp4"
    VERSION = 1


def fp4_fields(w: torch.Tensor, fmt: BlockFP) -> dict[str, torch.Tensor]:
    """Quantize ``w`` [out, in] (in a multiple of the block) → codes uint8 [out, in] plus scale fields."""
    fields = fmt.scales(w)
    codes = fmt.encode(w, fmt.expand(fmt.block_scale(fields), w.shape[1]))
    return {"codes": codes, **fields}


@METHODS.register("fp4")
class FP4Quantizer(Quantizer):
    config: FP4Config

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> LayerResult:
        fmt = self.format_for(name)
        fmt.validate_shape(linear.out_features, linear.in_features, name)
        tensors = fmt.pack(fp4_fields(linear.weight.data, fmt))
        mod = QuantLinear.from_packed(fmt, tensors, linear.in_features,
                                      linear.bias.data if linear.bias is not None else None)
        return LayerResult(mod)
