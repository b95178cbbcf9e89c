"""Round-to-nearest into the ``uniform`` format: per-group min/max scale and zero, then round."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats.uniform import Uniform
from llmcomp.quant.base import METHODS, LayerResult, QuantConfig, Quantizer


@register_config
@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    format: Uniform = Uniform()

    method = "rtn"
    VERSION = 1


def rtn_fields(w: torch.Tensor, fmt: Uniform) -> dict[str, torch.Tensor]:
    """Quantize ``w`` [out, in] group-wise (ragged last group allowed) → codes, scale, zero."""
    out_f, in_f = w.shape
    g = fmt.group(in_f)
    ng = fmt.n_groups(in_f)
    scales, zeros = [], []
    for j in range(ng):
        s, z = fmt.qparams(w[:, j * g : (j + 1) * g])
        scales.append(s)
        zeros.append(z)
    scale = torch.stack(scales, 1)  # (out, ng)
    zero = torch.stack(zeros, 1)
    codes = fmt.encode(w.float(), fmt.expand(scale, in_f), fmt.expand(zero, in_f))
    return {"codes": codes.to(torch.uint8), "scale": scale, "zero": zero}


@METHODS.register("rtn")
class RTNQuantizer(Quantizer):
    config: RTNConfig

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> LayerResult:
        fmt = self.format_for(name)
        fmt.validate_shape(linear.out_features, linear.in_features, name)
        tensors = fmt.pack(rtn_fields(linear.weight.data, fmt))
        mod = QuantLinear.from_packed(fmt, tensors, linear.in_features,
                                      linear.bias.data if linear.bias is not None else None)
        return LayerResult(mod)
