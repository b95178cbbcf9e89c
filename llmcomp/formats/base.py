"""The weight-format contract.

A format is a frozen dataclass spec registered by name. It knows the tensors it stores
(``param_specs``, which works without data so a skeleton can be built on the meta device), how to
``pack`` its fields into those tensors and ``unpack`` them again (bit-exact), and how to
``dequantize`` them with plain torch on any device. Kernels are keyed by ``name`` and must agree with
``dequantize``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from llmcomp.core.registry import Registry

FORMATS: Registry[type] = Registry("weight format")


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class WeightFormat:
    """Base class of weight-format specs (subclasses are frozen dataclasses)."""

    name: ClassVar[str]

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(
        self, tensors: dict[str, torch.Tensor], in_features: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        raise NotImplementedError

    def original_estimate(self, tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """float32 [out, in]: the stored approximation of the original weight (the dequantized weight, except
        where a format folds something else into it)."""
        return self.dequantize(tensors, in_features, torch.float32)

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        """Raise UserError if this format cannot store a layer of this shape."""

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        total = sum(s.nbytes for s in self.param_specs(out_features, in_features).values())
        return 8.0 * total / (out_features * in_features)

    def describe(self) -> str:
        return self.name
