"""A minimal LoRA (peft is not a dependency): ``y = base(x) + (x Aᵀ) Bᵀ · alpha/rank``, base frozen.

B starts at zero, so wrapping changes nothing until training moves it; ``merge`` folds the update
into a plain ``nn.Linear`` for the artifact.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.enabled = True

    @property
    def weight(self):  # code that reads projection shapes / devices still works
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + ((x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The base linear with the low-rank update folded into its weight."""
        delta = (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(modules, rank: int, alpha: float) -> list[LoRALinear]:
    """Wrap the q/k/v/o projections of each module (students) with LoRA; returns the adapters."""
    out = []
    for m in modules:
        for name in PROJECTIONS:
            base = getattr(m, name)
            if not isinstance(base, LoRALinear):
                base.weight.requires_grad_(False)
                if base.bias is not None:
                    base.bias.requires_grad_(False)
                setattr(m, name, LoRALinear(base, rank, alpha))
            out.append(getattr(m, name))
    return out


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear in ``model`` with its merged base linear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merge())


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters:
            a.enabled = True
