"""Feature maps φ for linear attention, registered by name. Input and output ``[B, H, T, ·]`` per head.

* ``hedgehog`` (Hedgehog / LoLCATs): a trainable per-head linear map D → F (identity-initialised),
  then ``[softmax(xW), softmax(-xW)]`` over the features: 2F non-negative, spiky, monotone in q·k —
  trained to mimic the teacher's softmax attention.
* ``softmax`` (Liger): softmax over the head dimension of the pretrained projection; no parameters.
* ``identity`` (Mamba-2 seeding: C = q, B = k): the projection itself scaled by D^-1/4, so that
  φ(q)·φ(k) is the attention logit q·k/√D.
"""
from __future__ import annotations

import torch
from torch import nn

from llmcomp.core.registry import Registry

FEATURE_MAPS: Registry[type] = Registry("feature map")


@FEATURE_MAPS.register("hedgehog")
class HedgehogMap(nn.Module):
    def __init__(self, heads: int, head_dim: int, feature_dim: int = 0, device=None, dtype=None):
        super().__init__()
        feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(torch.empty(heads, head_dim, feature_dim, device=device, dtype=dtype))
        self.out_dim = 2 * feature_dim
        if self.weight.device.type != "meta":
            with torch.no_grad():  # identity on the first min(D, F) features, so φ starts from q/k themselves
                self.weight.zero_()
                n = min(head_dim, feature_dim)
                self.weight[:, range(n), range(n)] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype))
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], -1)


@FEATURE_MAPS.register("softmax")
class SoftmaxMap(nn.Module):
    def __init__(self, heads: int, head_dim: int, feature_dim: int = 0, device=None, dtype=None):
        super().__init__()
        self.out_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(-1)


@FEATURE_MAPS.register("identity")
class IdentityMap(nn.Module):
    def __init__(self, heads: int, head_dim: int, feature_dim: int = 0, device=None, dtype=None):
        super().__init__()
        self.out_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.shape[-1] ** -0.25
