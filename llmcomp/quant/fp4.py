"""Round-to-nearest into the block-scaled float formats (``mxfp4``, ``nvfp4``, ``fp4``).

Each block's scale follows its format's spec (``fmt.scales``: E8M0 floor(log2 amax) - 2 for MX,
E4M3 amax/6 over an FP32 tensor scale for NV, float16 amax/max for fp4); elements are then rounded to
nearest even on the minifloat grid with saturation (``fmt.encode``). GPTQ with an FP4 grid lives in
``gptq.py`` (``--method gptq --format nvfp4``), on the same pieces.

``search`` (LLM-FP4, Liu et al. 2023, weight part): per layer, choose the 4-bit element (E2M1, E1M2,
E3M0 — how the bits split between exponent and mantissa) and a clipping ratio of each group's maximum
that minimize the layer's output error on calibration data, ``tr(D H Dᵀ)`` with ``D = Wq − W`` and
``H = 2XᵀX/n``. With a free float16 scale per group the exponent bias only rescales the grid, which the
scale absorbs, so the clipping ratio is what the bias search becomes here. The default (E2M1, no clip)
is always a candidate, so the search is never worse than RTN on that objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats.fp4 import FP4, MXFP4, BlockFP
from llmcomp.formats.minifloat import E2M1, Minifloat
from llmcomp.quant import actquant
from llmcomp.quant.base import METHODS, LayerResult, QuantConfig, Quantizer, require_stats
from llmcomp.quant.hessian import HessianAccumulator

SEARCH_ELEMENTS = (E2M1, Minifloat(1, 2), Minifloat(3, 0))
SEARCH_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


@register_config
@dataclass(frozen=True)
class FP4Config(QuantConfig):
    format: BlockFP = MXFP4()
    search: bool = False  # LLM-FP4 per-layer element + clipping search (needs calibration; format fp4 only)
    act_bits: int = 16  # 4: W4A4, inputs rounded per token inside the layer (format ``actquant``)
    act_format: str = "fp"  # W4A4 activation element: fp (E2M1) or int (INT4 ±7)
    smooth: float = 0.5  # W4A4: migration strength α of the per-channel input scale folded into the weights

    method = "fp4"
    VERSION = 1

    def __post_init__(self):
        actquant.check(self.act_bits, self.act_format, self.smooth)
        fixed = next((f for f in (self.format, *self.formats.values()) if not isinstance(f, FP4)), None)
        if self.search and fixed is not None:  # (a per-layer MXFP4 failed inside the search: no group_size)
            raise UserError(f"--search chooses the element and clipping of --format fp4; {fixed.name} fixes "
                            "both by its spec (use --format fp4).")


def fp4_fields(w: torch.Tensor, fmt: BlockFP) -> dict[str, torch.Tensor]:
    """Quantize ``w`` [out, in] (in a multiple of the block) → codes uint8 [out, in] plus scale fields."""
    fields = fmt.scales(w)
    codes = fmt.encode(w, fmt.expand(fmt.block_scale(fields), w.shape[1]))
    return {"codes": codes, **fields}


def clipped_fields(w: torch.Tensor, fmt: FP4, clip: float) -> dict[str, torch.Tensor]:
    """``fp4_fields`` with each group's scale set from ``clip`` × its max |w| (values above saturate)."""
    amax = fmt.blocks(w).abs().amax(-1)
    scale = (clip * amax / fmt.element.max_value).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    codes = fmt.encode(w, fmt.expand(scale.float(), w.shape[1]))
    return {"codes": codes, "scale": scale}


def output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    D = (q - w).float()
    return float(((D @ H) * D).sum())


@torch.no_grad()
def search_fp4(w: torch.Tensor, fmt: FP4, H: torch.Tensor) -> tuple[FP4, dict, dict]:
    """The (element, clip) of the lowest output error. Returns (format, fields, metrics)."""
    best = None
    default_err = None
    for element in SEARCH_ELEMENTS:
        cand = FP4(group_size=fmt.group_size, element=element)
        for clip in SEARCH_CLIPS:
            fields = clipped_fields(w, cand, clip)
            q = cand.element.decode(fields["codes"]) * cand.expand(fields["scale"].float(), w.shape[1])
            err = output_error(w, q, H)
            if element == E2M1 and clip == 1.0:
                default_err = err
            if best is None or err < best[0]:
                best = (err, cand, fields, clip)
    err, cand, fields, clip = best
    return cand, fields, {"element": cand.element.describe(), "clip": clip,
                          "err_vs_default": round(err / max(default_err, 1e-30), 4)}


@METHODS.register("fp4")
class FP4Quantizer(Quantizer):
    config: FP4Config

    @property
    def needs_calibration(self) -> bool:  # the search and the input scales are fitted on calibration data
        return self.config.search or actquant.needs_stats(self.config)

    def observe(self, linear: nn.Linear):
        return HessianAccumulator.for_linear(linear) if self.needs_calibration else None

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> LayerResult:
        fmt = self.format_for(name)
        fmt.validate_shape(linear.out_features, linear.in_features, name)
        metrics = {}
        w = linear.weight.data.float()
        H = None
        if self.needs_calibration:
            require_stats(stats, "FP4 search/W4A4", name)
            H = stats.H.to(w.device)
        in_scale = None
        if self.config.act_bits < 16:
            w, H, in_scale = actquant.fold(w, H, self.config.smooth)
        if self.config.search:
            fmt, fields, metrics = search_fp4(w, fmt, H)
        else:
            fields = fp4_fields(w, fmt)
        if in_scale is not None:
            fmt, fields = actquant.wrap(fmt, fields, in_scale, self.config.act_format)
        tensors = fmt.pack(fields)
        mod = QuantLinear.from_packed(fmt, tensors, linear.in_features,
                                      linear.bias.data if linear.bias is not None else None)
        return LayerResult(mod, metrics)
