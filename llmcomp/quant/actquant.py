"""Activation quantization inside the layer (W4A4), shared by the methods that offer it (``rtn``, ``fp4``).

The layer's inputs are divided by a per-channel ``input_scale`` that is folded into the weights before
they are quantized (LLM-FP4's "pre-shifted exponent bias", SmoothQuant's form), then rounded per token
to a 4-bit element: E2M1 (``fp``) or sign + 3-bit integer magnitude (``int``: E0M3, the symmetric INT4
grid ±7). The result is stored as the ``actquant`` format around the method's weight format.
"""
from __future__ import annotations

import torch

from llmcomp.errors import UserError
from llmcomp.formats.actquant import ActQuant
from llmcomp.formats.minifloat import E2M1, Minifloat

ACT_ELEMENTS = {"fp": E2M1, "int": Minifloat(0, 3)}


def check(act_bits: int, act_format: str, smooth: float) -> None:
    if act_bits not in (4, 16):
        raise UserError(f"--act-bits must be 4 (W4A4) or 16 (weights only), got {act_bits}.")
    if act_format not in ACT_ELEMENTS:
        raise UserError(f"activation format must be one of {', '.join(ACT_ELEMENTS)}, got {act_format!r}.")
    if not 0 <= smooth <= 1:
        raise UserError(f"smoothing strength must be in [0, 1], got {smooth}.")


def needs_stats(config) -> bool:
    """W4A4 fits its input scales on calibration data (α = 0 needs none: the scales are 1)."""
    return config.act_bits < 16 and config.smooth > 0


def input_scale(w: torch.Tensor, H, alpha: float) -> torch.Tensor:
    """Per-input-channel divisor of the activations: ``s_j = rms(x_j)^α / max|W_:j|^(1−α)``, normalized to
    geometric mean 1 and rounded to float16 (what is stored), so per-token activation scales see flattened
    channels. α = 0 or no statistics: 1. A channel silent on every calibration token keeps 1 too (from its floor
    of 1e-5 it took a tiny s, and a token that did reach it at inference was multiplied by up to 1e4, setting the
    token's activation scale for every other channel)."""
    if H is None or alpha == 0:
        return torch.ones(w.shape[1], device=w.device)
    diag = torch.diagonal(H).clamp(min=0)
    live = diag > 0
    if not bool(live.any()):
        return torch.ones(w.shape[1], device=w.device)
    act = (diag / 2).sqrt().clamp(min=1e-5)
    wmax = w.abs().amax(0).clamp(min=1e-5)
    s = act.pow(alpha) / wmax.pow(1 - alpha)
    s = s / s[live].log().mean().exp()
    s = torch.where(live, s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4).half().float()


def fold(w: torch.Tensor, H, alpha: float):
    """(w·diag(s), H seen by the scaled inputs, s): x·Wᵀ = (x / s)·(W·diag(s))ᵀ."""
    s = input_scale(w, H, alpha)
    w = w * s[None, :]
    if H is not None:
        H = H / s[:, None] / s[None, :]
    return w, H, s


def wrap(fmt, fields: dict, in_scale: torch.Tensor, act_format: str):
    """The ``actquant`` format around ``fmt`` and its fields (plus the stored input scale)."""
    return ActQuant(base=fmt, act=ACT_ELEMENTS[act_format]), {**fields, "input_scale": in_scale}
