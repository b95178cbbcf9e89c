"""``actquant``: a weight format whose layer also quantizes its inputs (W4A4 and the like).

The weights are stored in ``base`` (e.g. ``fp4``); the layer's input is divided by a per-channel
``input_scale`` (float16 [in], folded into the weights before they were quantized: the LLM-FP4
"pre-shifted exponent bias", which moves the per-channel spread of activations into the weights so
that the activation format can stay per-token) and then rounded to ``act`` (a 4-bit minifloat by
default) with one float32 scale per token (its max |x| over the element's max). Because the format
is recorded per module in the manifest, ``llmcomp.load`` reproduces the activation quantization.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.fp4 import FP4
from llmcomp.formats.minifloat import E2M1, Minifloat

# the method configs' W4A4 settings beside act_bits (quant.actquant): nothing reads them at 16-bit activations,
# so a weights-only run's config is shown without them (report.facts.shown_config)
WEIGHTS_ONLY_UNUSED = ("act_format", "smooth")


@FORMATS.register("actquant")
@register_config
@dataclass(frozen=True)
class ActQuant(WeightFormat):
    base: WeightFormat = FP4()
    act: Minifloat = E2M1

    name = "actquant"
    VERSION = 1

    def describe(self) -> str:
        return f"{self.base.describe()}, inputs {self.act.describe()} per token"

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        self.base.validate_shape(out_features, in_features, layer)

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        return {**self.base.param_specs(out_features, in_features),
                "input_scale": TensorSpec((in_features,), torch.float16)}

    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.base.pack(fields), "input_scale": fields["input_scale"].to(torch.float16).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        return {**self.base.unpack(tensors, in_features), "input_scale": tensors["input_scale"]}

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.dequantize(tensors, in_features, dtype)  # already multiplied by input_scale

    def original_estimate(self, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """W · diag(input_scale) unfolded: what approximates the original weight."""
        return self.base.dequantize(tensors, in_features, torch.float32) / tensors["input_scale"].float()

    def quantize_input(self, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """x / input_scale, rounded to ``act`` with a per-token scale (fake-quantized, in x's dtype)."""
        xs = x.float() / tensors["input_scale"].float()
        scale = xs.abs().amax(-1, keepdim=True) / self.act.max_value
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = self.act.decode(self.act.encode(xs / safe)) * safe
        return q.to(x.dtype)
