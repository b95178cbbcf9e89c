"""GPTQ (Frantar et al., 2022) into the ``uniform`` format.

Quantize one column at a time and spread its rounding error over the columns not yet quantized, using
the upper Cholesky factor ``U`` of ``H⁻¹`` (``H = 2XᵀX/n`` from ``hessian.py``); updates inside a block
of ``block_size`` columns are applied eagerly, the rest lazily once per block (one matmul).

Groups and activation order:
- ``act_order`` quantizes columns in order of decreasing ``diag(H)`` (the most used inputs first,
  while there is the most freedom left to compensate them).
- ``static_groups`` computes every group's scale and zero **up front from the original weights**
  (min/max, the same grid math as RTN). Each column keeps the scale of its own group, so the artifact is
  the plain ``uniform`` format in natural column order: no permutation and no ``g_idx`` at inference.
  Activation order requires static groups.
- Without static groups (and without act-order) a group's scale and zero are computed when the solver
  reaches its first column, from the error-updated weights: the original GPTQ.

The ragged last group (``in % group_size != 0``) and per-channel (``group_size=0``) need nothing special:
the grid of column ``j`` is the grid of group ``j // group_size``.

The solver (``gptq_solve``) only sees a rounding function ``round_col(j, ahead) -> column`` so another
grid (e.g. FP4) can reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from llmcomp.core import memory
from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats.fp4 import BlockFP
from llmcomp.formats.outliers import Outliers
from llmcomp.formats.uniform import Uniform
from llmcomp.quant.base import METHODS, HessianQuantizer, LayerResult, QuantConfig
from llmcomp.quant.hessian import (HessianAccumulator, check_damp, flush_denormal, inverse_cholesky,
                                   output_error)

# round_col(j, ahead) -> the quantized (dequantized-value) column j, in the solver's column order.
# ``ahead`` is the current, error-updated working copy of columns j .. end of the current block
# (ahead[:, 0] is column j itself).
RoundFn = Callable[[int, torch.Tensor], torch.Tensor]


@register_config
@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    format: Uniform | BlockFP = Uniform()  # (BlockFP: GPTQ's error feedback on the FP4 grids)
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = True
    outliers: float = 0.0  # fraction of weights kept in fp16 (SpQR-style), stored in the ``outliers`` format

    method = "gptq"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise UserError(f"GPTQ block size must be a positive integer, got {self.block_size}.")
        check_damp(self.damp, "GPTQ")
        if not 0 <= self.outliers < 0.5:
            raise UserError(f"--outliers must be a fraction in [0, 0.5) such as 0.005 (0.5 %), got {self.outliers}.")
        if self.outliers and not self.static_groups:
            raise UserError("GPTQ outliers need static groups (the grid is fitted to the weights without them).")
        if self.act_order and not self.static_groups:
            raise UserError("GPTQ act-order needs static groups (the uniform format stores no column permutation); "
                            "set static_groups=True or act_order=False.")
        if self.outliers and any(isinstance(f, BlockFP) for f in (self.format, *self.formats.values())):
            raise UserError("GPTQ outliers are implemented for the uniform format only, not FP4.")  # before any work


@torch.no_grad()
def gptq_solve(W: torch.Tensor, U: torch.Tensor, round_col: RoundFn, block_size: int = 128) -> torch.Tensor:
    """Quantize ``W`` [out, n] column by column in the given order; returns the quantized values ``Q``.

    ``U``: upper Cholesky factor of the (dampened) inverse Hessian in the same column order.
    """
    W = W.float().clone()
    Q = torch.zeros_like(W)
    n = W.shape[1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = round_col(i1 + i, W1[:, i:])
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        if i2 < n:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return Q


def static_grid(W: torch.Tensor, fmt: Uniform) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale and zero [out, n_groups] from ``W`` (min/max per group, ragged last group)."""
    in_f = W.shape[1]
    g = fmt.group(in_f)
    pairs = [fmt.qparams(W[:, j : j + g]) for j in range(0, in_f, g)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def uniform_round(fmt: Uniform, scale_cols: torch.Tensor, zero_cols: torch.Tensor) -> RoundFn:
    """Round column j onto a fixed grid: ``scale_cols``/``zero_cols`` [out, n] in solver column order."""

    def round_col(j: int, ahead: torch.Tensor) -> torch.Tensor:
        s, z = scale_cols[:, j], zero_cols[:, j]
        return (fmt.encode(ahead[:, 0], s, z) - z) * s

    return round_col


def blockfp_round(fmt, scale_cols: torch.Tensor) -> RoundFn:
    """Round column j onto a block-scaled minifloat grid (mxfp4/nvfp4/fp4): ``scale_cols`` [out, n] are
    the block multipliers in solver column order. The non-uniform grid is why the solver takes a
    rounding function."""

    def round_col(j: int, ahead: torch.Tensor) -> torch.Tensor:
        s = scale_cols[:, j]
        return fmt.element.decode(fmt.encode(ahead[:, 0], s)) * s

    return round_col


def with_outliers(round_col: RoundFn, mask_cols: torch.Tensor) -> RoundFn:
    """Outlier entries (``mask_cols`` [out, n], solver order) keep their error-updated value: no rounding
    error there, and the value the solver settles on is the one stored in fp16."""

    def rounded(j: int, ahead: torch.Tensor) -> torch.Tensor:
        return torch.where(mask_cols[:, j], ahead[:, 0], round_col(j, ahead))

    return rounded


def pick_outliers(W: torch.Tensor, fmt: Uniform, hinv_diag: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` weights whose rounding would cost the most output error: the OBS saliency
    ``(w - q(w))² / [H⁻¹]_jj``. On a min/max grid a weight that sets its group's range rounds exactly,
    so the grid is fitted without the ``2·count`` most extreme weights (largest |z-score| within their
    group) first: a range-setting outlier then saturates and scores high. Returns a bool mask [out, in]."""
    out_f, in_f = W.shape
    g = fmt.group(in_f)
    z = torch.empty_like(W)
    for j in range(0, in_f, g):
        blk = W[:, j:j + g]
        # (the population std: a one-column group has no sample std, and NaN z-scores ranked first)
        spread = blk.std(1, keepdim=True, correction=0).clamp(min=1e-12)
        z[:, j:j + g] = (blk - blk.mean(1, keepdim=True)).abs() / spread
    extreme = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    extreme[torch.topk(z.flatten(), min(2 * count, W.numel())).indices] = True
    scale, zero = static_grid(W.masked_fill(extreme.view_as(W), 0.0), fmt)
    S, Z = fmt.expand(scale, in_f), fmt.expand(zero, in_f)
    q = (fmt.encode(W, S, Z) - Z) * S
    saliency = (W - q).pow(2) / hinv_diag.clamp(min=1e-12)[None, :]
    mask = torch.zeros(W.numel(), dtype=torch.bool, device=W.device)
    mask[torch.topk(saliency.flatten(), count).indices] = True
    return mask.view_as(W)


class LazyGroupRound:
    """Original GPTQ groups: a group's grid comes from the error-updated weights at its first column.

    Needs solver blocks that start on group boundaries (so ``ahead`` holds the whole group).
    """

    def __init__(self, fmt: Uniform, out_f: int, in_f: int, device):
        self.fmt, self.g = fmt, fmt.group(in_f)
        ng = fmt.n_groups(in_f)
        self.scale = torch.zeros(out_f, ng, device=device)
        self.zero = torch.zeros(out_f, ng, device=device)

    def __call__(self, j: int, ahead: torch.Tensor) -> torch.Tensor:
        k = j // self.g
        if j % self.g == 0:
            s, z = self.fmt.qparams(ahead[:, : self.g])
            self.scale[:, k], self.zero[:, k] = s, z
        s, z = self.scale[:, k], self.zero[:, k]
        return (self.fmt.encode(ahead[:, 0], s, z) - z) * s


@METHODS.register("gptq")
class GPTQQuantizer(HessianQuantizer):
    config: GPTQConfig
    label = "GPTQ"

    def check_layers(self, model: nn.Module, names: list[str]) -> None:
        """--outliers that keeps no weight of any selected layer wrote the plain format under the outlier method's
        name, silently. (A small layer, such as a shared-expert gate of one row, may keep none by itself.)"""
        if not self.config.outliers:
            return
        shapes = [model.get_submodule(n).weight.shape for n in names]
        if not any(Outliers(base=self.format_for(n), fraction=self.config.outliers).count(*s)
                   for n, s in zip(names, shapes)):
            raise UserError(f"--outliers {100 * self.config.outliers:g}% keeps none of the weights of any layer "
                            f"(the largest has {max(s.numel() for s in shapes)}); raise it or leave it out.")

    @torch.no_grad()
    def quantize_linear(self, name: str, linear: nn.Linear, stats: HessianAccumulator | None = None) -> LayerResult:
        cfg = self.config
        fmt, W0 = self.layer_weight(name, linear, stats)
        out_f, in_f = linear.out_features, linear.in_features
        device = W0.device
        with flush_denormal():
            dh = stats.finalize(cfg.damp)
            dh.H = dh.H.to(device)
            # Under a --max-memory GPU cap the undampened H waits in CPU memory until the error metric
            # needs it again (an exact copy back; q/k/v, which share it, find it where it was).
            parked = stats.H.device if memory.active_cap(stats.H.device) is not None else None
            if parked is not None:
                stats.H = stats.H.cpu()
            dead = dh.dead.to(device)
            W = W0.clone()
            W[:, dead] = 0  # inputs never seen in calibration: their weights do not matter there

            floating = isinstance(fmt, BlockFP)  # FP4 grid: block scales fixed up front, like static groups
            if floating and cfg.outliers:
                raise UserError("GPTQ outliers are implemented for the uniform format only, not FP4.")
            lazy = not floating and not cfg.static_groups and fmt.n_groups(in_f) > 1  # one group: same either way
            perm = None
            if not lazy and cfg.act_order:
                perm = torch.argsort(torch.diagonal(dh.H), descending=True, stable=True)
                dh.H = dh.H[perm[:, None], perm]  # one gather: no second in×in temporary
            U, dh = inverse_cholesky(dh)
            dh.H = None  # only U is needed from here on; frees an in×in matrix for the solve
            mask = None
            if cfg.outliers:
                hinv_diag = U.pow(2).sum(0)  # diag(H⁻¹) = diag(UᵀU), solver order
                if perm is not None:
                    hinv_diag = hinv_diag[torch.argsort(perm)]
                ofmt = Outliers(base=fmt, fraction=cfg.outliers)
                mask = pick_outliers(W, fmt, hinv_diag, ofmt.count(out_f, in_f))
            if floating:
                fp_fields = fmt.scales(W)
                S = fmt.expand(fmt.block_scale(fp_fields), in_f)
                rounder = blockfp_round(fmt, S if perm is None else S[:, perm])
                block = cfg.block_size
            elif lazy:
                g = fmt.group(in_f)
                rounder = LazyGroupRound(fmt, out_f, in_f, device)
                block = max(g, cfg.block_size // g * g)  # blocks must start on group boundaries
            else:
                # the grid spans the remaining weights only (a zero never widens a min/max range)
                scale, zero = static_grid(W if mask is None else W.masked_fill(mask, 0.0), fmt)
                block = cfg.block_size
                s_cols, z_cols = fmt.expand(scale, in_f), fmt.expand(zero, in_f)
                if perm is not None:
                    s_cols, z_cols = s_cols[:, perm], z_cols[:, perm]
                rounder = uniform_round(fmt, s_cols, z_cols)
                if mask is not None:
                    rounder = with_outliers(rounder, mask if perm is None else mask[:, perm])

            Wp = W if perm is None else W[:, perm]
            Q = gptq_solve(Wp, U, rounder, block)
            del U, Wp, W  # in×in and out×in buffers the packing below does not need
            if perm is not None:
                Q = Q[:, torch.argsort(perm)]
            if lazy:
                scale, zero = rounder.scale, rounder.zero
            if floating:
                fields = {**fp_fields, "codes": fmt.encode(Q, S)}
            else:
                codes = fmt.encode(Q, fmt.expand(scale, in_f), fmt.expand(zero, in_f))
                fields = {"codes": codes.to(torch.uint8), "scale": scale, "zero": zero}
            if mask is not None:
                index = mask.flatten().nonzero().squeeze(1)
                fields.update(outlier_index=index, outlier_value=Q.flatten()[index])
                fmt = ofmt
                Q = Q.flatten().index_put((index,), Q.flatten()[index].half().float()).view_as(Q)

            if parked is not None:
                stats.H = stats.H.to(parked)
            rel_err = output_error(W0, Q, stats.H.to(device))
        tensors = fmt.pack(fields)
        mod = QuantLinear.from_packed(fmt, tensors, in_f, linear.bias.data if linear.bias is not None else None)
        metrics = {"out_err_rel": round(rel_err, 6)}
        if dh.percdamp != cfg.damp:
            metrics["damp"] = dh.percdamp
        if int(dead.sum()):
            metrics["dead_inputs"] = int(dead.sum())
        return LayerResult(mod, metrics)
