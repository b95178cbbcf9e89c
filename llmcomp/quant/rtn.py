"""Round-to-nearest into the ``uniform`` format: per-group min/max scale and zero, then round.

``act_bits=4`` makes it INT4 W4A4 (by default): the inputs are rounded per token inside the layer
(``quant/actquant.py``), with per-channel input scales fitted on calibration data."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats.uniform import Uniform
from llmcomp.quant import actquant
from llmcomp.quant.base import METHODS, LayerResult, QuantConfig, Quantizer, require_stats
from llmcomp.quant.hessian import HessianAccumulator


@register_config
@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    format: Uniform = Uniform()
    act_bits: int = 16  # 4: W4A4, inputs rounded per token inside the layer (format ``actquant``)
    act_format: str = "int"  # W4A4 activation element: int (INT4 ±7) or fp (E2M1)
    smooth: float = 0.5  # W4A4: migration strength α of the per-channel input scale folded into the weights

    method = "rtn"
    VERSION = 1

    def __post_init__(self):
        actquant.check(self.act_bits, self.act_format, self.smooth)


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

    @property
    def needs_calibration(self) -> bool:  # W4A4's input scales are fitted on calibration data
        return actquant.needs_stats(self.config)

    def observe(self, linear: nn.Linear):
        return HessianAccumulator.for_linear(linear) if self.needs_calibration else None

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> LayerResult:
        fmt = self.format_for(name)
        fmt.validate_shape(linear.out_features, linear.in_features, name)
        w, in_scale = linear.weight.data, None
        if self.config.act_bits < 16:
            H = None
            if self.needs_calibration:
                require_stats(stats, "W4A4 input scales", name)
                H = stats.H.to(w.device)
            w, _, in_scale = actquant.fold(w.float(), H, self.config.smooth)
        fields = rtn_fields(w, fmt)
        if in_scale is not None:
            fmt, fields = actquant.wrap(fmt, fields, in_scale, self.config.act_format)
        tensors = fmt.pack(fields)
        mod = QuantLinear.from_packed(fmt, tensors, linear.in_features,
                                      linear.bias.data if linear.bias is not None else None)
        return LayerResult(mod)
