"""``outliers``: a base format plus a sparse set of weights kept exactly in float16 (the SpQR idea).

The base format stores every weight (the code at an outlier's position is whatever the base encoder
chose); ``outlier_index`` (int32, flat ``row * in_features + col``, ascending) and ``outlier_value``
(float16) then overwrite those positions at dequantize time. The number of outliers is
``round(fraction · out · in)``, fixed by the shape, so the tensors' shapes are known before any data
(the loader builds its skeleton from ``param_specs``). Each outlier costs 48 bits, counted in
``bits_per_weight`` like the base format's scales and zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.uniform import Uniform


@FORMATS.register("outliers")
@register_config
@dataclass(frozen=True)
class Outliers(WeightFormat):
    base: Uniform = Uniform()
    fraction: float = 0.005

    name = "outliers"
    VERSION = 1

    def __post_init__(self):
        if not 0 < self.fraction < 0.5:
            raise UserError(f"Outlier fraction must be in (0, 0.5), e.g. 0.005 for 0.5 %, got {self.fraction}.")

    def count(self, out_features: int, in_features: int) -> int:
        return int(round(self.fraction * out_features * in_features))

    def describe(self) -> str:
        return f"{self.base.describe()} + {100 * self.fraction:g}% fp16 outliers"

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        self.base.validate_shape(out_features, in_features, layer)

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        k = self.count(out_features, in_features)
        return {**self.base.param_specs(out_features, in_features),
                "outlier_index": TensorSpec((k,), torch.int32), "outlier_value": TensorSpec((k,), torch.float16)}

    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fields: the base format's fields plus ``outlier_index`` (flat, any order) and ``outlier_value``."""
        idx = fields["outlier_index"].to(torch.int64).flatten()
        order = torch.argsort(idx)
        out = self.base.pack(fields)
        out["outlier_index"] = idx[order].to(torch.int32).contiguous()
        out["outlier_value"] = fields["outlier_value"].flatten()[order].to(torch.float16).contiguous()
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        fields = self.base.unpack(tensors, in_features)
        fields["outlier_index"] = tensors["outlier_index"]
        fields["outlier_value"] = tensors["outlier_value"]
        return fields

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.base.dequantize(tensors, in_features, dtype=torch.float32)
        w.view(-1)[tensors["outlier_index"].to(torch.int64)] = tensors["outlier_value"].float()
        return w.to(dtype)
