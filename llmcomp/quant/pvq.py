"""Pyramid vector quantization for LLMs (van der Ouderaa et al., 2024) into the ``pyramid`` format.

Each group of N weights down a column (N consecutive output rows of one input) becomes a direction on
the pyramid P(N, K) — the standard greedy projection (``formats.pyramid.project``) — and a gain:

- the gain is the projection ⟨w, ŷ⟩ (ŷ = y/‖y‖), the least-squares gain for that direction;
- gains are coded on a per-layer table of 2**norm_bits levels fitted by 1-D Lloyd (weighted k-means,
  each group weighted by its input's Hessian diagonal) on the gains of the plain projection: the
  distribution-optimal amplitude quantizer for this layer;
- ``hessian`` (default): columns are fixed in activation order with GPTQ error feedback through the
  inverse Hessian (``vecsolve.solve_groups`` with one column a group). A column is quantized whole, so
  the feedback is exactly GPTQ's; groups along a row (the first design) lose the feedback inside a
  group and measured 10–45 % more output error at the same bits;
- the format's ``rotate``: weights and Hessian are rotated by a seeded random Hadamard matrix along
  the input dimension first (incoherence, as the paper does), and the format undoes it at dequantize.

``pyramid_for_bits`` picks (N, K, norm bits) for a requested bits per weight: the K whose code bits
(⌈log₂ V(N, K)⌉ + norm bits) / N are nearest, within ``BITS_TOLERANCE``; otherwise a UserError names
the nearest reachable values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import hadamard
from llmcomp.formats.pvq_index import pyramid_sizes
from llmcomp.formats.pyramid import Pyramid, project
from llmcomp.quant.base import METHODS, LayerResult, QuantConfig, Quantizer, require_stats
from llmcomp.quant.hessian import HessianAccumulator, check_damp
from llmcomp.quant.kmeans import assign, kmeans
from llmcomp.quant.hessian import output_error
from llmcomp.quant.vecsolve import solve_groups

DEFAULT_DIM = 64
BITS_TOLERANCE = 0.05
MAX_PULSES = 1024
F16_MAX = torch.finfo(torch.float16).max  # the gain levels are stored as float16


def default_norm_bits(dim: int) -> int:
    """Gain bits a group: about a quarter of a bit a weight for small groups, at most 8."""
    return int(min(8, max(3, dim // 4 + 2)))


def reachable_bits(dim: int, norm_bits: int | None = None, max_bits: float = 8.0) -> list[tuple[float, int]]:
    """(code bits a weight, K) for K = 1, 2, … while the code bits stay ≤ ``max_bits``."""
    nb = default_norm_bits(dim) if norm_bits is None else norm_bits
    out = []
    sizes = pyramid_sizes(dim, MAX_PULSES)
    for k in range(1, MAX_PULSES + 1):
        b = ((sizes[k] - 1).bit_length() + nb) / dim
        if b > max_bits:
            break
        out.append((b, k))
    return out


def pyramid_for_bits(bits: float, dim: int | None = None, norm_bits: int | None = None, **kw) -> Pyramid:
    dim = DEFAULT_DIM if dim is None else dim
    if not isinstance(dim, int) or not 2 <= dim <= 256:
        raise UserError(f"--vector-len for PVQ must be an integer from 2 to 256, got {dim}.")
    nb = default_norm_bits(dim) if norm_bits is None else norm_bits
    table = reachable_bits(dim, nb)
    best = min(table, key=lambda bk: (abs(bk[0] - bits), bk[0]))
    if abs(best[0] - bits) > BITS_TOLERANCE:
        below = [b for b, _ in table if b < bits]
        above = [b for b, _ in table if b > bits]
        near = ", ".join(f"{b:.3f}" for b in ([below[-1]] if below else []) + ([above[0]] if above else []))
        raise UserError(f"--bits {bits:g} is not reachable by PVQ with vectors of {dim} ({nb}-bit gains); "
                        f"nearest reachable: {near}.")
    return Pyramid(dim=dim, pulses=best[1], norm_bits=nb, **kw)


@register_config
@dataclass(frozen=True)
class PVQConfig(QuantConfig):
    format: Pyramid = Pyramid()
    hessian: bool = True
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    host_solve: bool = True  # the Hessian solve on the CPU even when calibrating on a GPU (see quantize_linear)

    method = "pvq"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.format, Pyramid):
            raise UserError(f"--method pvq writes the pyramid format, not {type(self.format).__name__}.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise UserError(f"PVQ block size must be a positive integer, got {self.block_size}.")
        check_damp(self.damp, "PVQ")


def directions(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pyramid points y (int16 [G, N]) and unit directions ŷ (float [G, N]) of the rows of ``x``."""
    y = project(x, k)
    yf = y.float()
    return y, yf / yf.norm(dim=1, keepdim=True)


@METHODS.register("pvq")
class PVQQuantizer(Quantizer):
    config: PVQConfig

    @property
    def needs_calibration(self) -> bool:
        return self.config.hessian

    def observe(self, linear: nn.Linear):
        return HessianAccumulator.for_linear(linear) if self.config.hessian else None

    @torch.no_grad()
    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> LayerResult:
        cfg, fmt = self.config, self.format_for(name)
        out_f, in_f = linear.out_features, linear.in_features
        fmt.validate_shape(out_f, in_f, name)
        if cfg.hessian:
            require_stats(stats, "PVQ with the Hessian", name)
        W0 = linear.weight.data.float()
        dev, N, K = W0.device, fmt.dim, fmt.pulses
        H0 = stats.H.to(dev) if cfg.hessian else None
        W = hadamard.rotate(W0, fmt.seed) if fmt.rotate else W0
        H = hadamard.rotate_hessian(H0, fmt.seed) if fmt.rotate and H0 is not None else H0
        B = out_f // N

        # gain levels: 1-D Lloyd on the gains of the plain projection, weighted by the inputs' H_jj
        x = fmt.groups(W).reshape(-1, N)  # (B·in, N)
        y, yh = directions(x, K)
        gains = (x * yh).sum(1, keepdim=True)
        wgt = None if H is None else torch.diagonal(H).clamp(min=0).repeat(B)[:, None]
        n_lv = 1 << fmt.norm_bits
        levels = kmeans(gains, wgt, min(n_lv, gains.shape[0]), iters=30, seed=0)
        levels = levels.clamp(-F16_MAX, F16_MAX).half().float().squeeze(1)
        levels = torch.sort(levels).values
        levels = torch.cat([levels, levels[-1:].expand(n_lv - levels.numel())])  # fewer groups than levels

        def encode_gains(g: torch.Tensor) -> torch.Tensor:
            return assign(g[:, None], None, levels[:, None])

        dh = None
        if cfg.hessian:
            # The solve is sequential over input columns, each a few dozen tiny ops on ≤ 24 groups plus a host
            # round trip for the pulse loop: latency-bound, so a GPU pays a launch per op and loses to the CPU
            # (H200: the bundled model did not finish in 9 min on the GPU). Only W, H and the result travel.
            sdev = torch.device("cpu") if cfg.host_solve else dev
            W, H, levels = W.to(sdev), H.to(sdev), levels.to(sdev)
            pulses = torch.zeros(out_f, in_f, dtype=torch.int16, device=sdev)
            codes = torch.zeros(B, in_f, dtype=torch.int64, device=sdev)

            def quantize_column(j: int, t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
                col = t[:, 0].reshape(B, N)
                y, yh = directions(col, K)
                c = encode_gains((col * yh).sum(1))
                pulses[:, j] = y.reshape(-1)
                codes[:, j] = c
                return (levels[c][:, None] * yh).reshape(-1, 1)

            columns = torch.arange(in_f, device=sdev)[:, None]
            Q, dh = solve_groups(W, H, columns, quantize_column, cfg.damp, cfg.block_size, cfg.act_order)
            Q, pulses, codes, levels = Q.to(dev), pulses.to(dev), codes.to(dev), levels.to(dev)
        else:  # every group on its own: all at once
            codes = encode_gains(gains[:, 0])
            pulses = fmt.ungroup(y.reshape(B, in_f, N))
            Q = fmt.ungroup((levels[codes][:, None] * yh).reshape(B, in_f, N))
            codes = codes.reshape(B, in_f)
        tensors = fmt.pack({"pulses": pulses, "norm_code": codes, "norm_levels": levels})
        mod = QuantLinear.from_packed(fmt, tensors, in_f, linear.bias.data if linear.bias is not None else None,
                                      out_features=out_f)
        if fmt.rotate:
            Q = hadamard.unrotate(Q, fmt.seed)
        metrics = {"bits_per_weight": round(fmt.bits_per_weight(out_f, in_f), 4)}
        if H0 is not None:
            metrics["out_err_rel"] = round(output_error(W0, Q, H0), 6)
        if dh is not None and dh.percdamp != cfg.damp:
            metrics["damp"] = dh.percdamp
        return LayerResult(mod, metrics)
