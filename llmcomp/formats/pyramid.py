"""``pyramid``: pyramid vector quantization (PVQ) of groups of ``dim`` weights along the output dimension.

Each group w (N = ``dim`` consecutive output rows of one input column) is stored as a gain and a
direction:

    ŵ[gN:(g+1)N, j] = level[c[g, j]] · y / ‖y‖₂,     y ∈ P(N, K) = {y ∈ ℤᴺ : Σ|yᵢ| = K}

- the direction is a point y of the pyramid with K = ``pulses`` unit pulses, stored as its exact
  enumeration index (pvq_index.py): ⌈log₂ V(N, K)⌉ bits a group, no codebook in memory;
- the gain is a ``norm_bits`` code into ``norm_levels`` (float16, one small table a layer, fitted by
  the quantizer: a distribution-optimal 1-D quantizer of the gains).
Groups run down a column (not along a row) so that GPTQ's column-by-column error feedback is exact:
a column is quantized whole, in the Euclidean metric its feedback step minimizes.
With ``rotate`` the stored weights are ``W·R`` for a seeded random Hadamard ``R`` along the input
dimension (hadamard.py) and dequantize applies ``Rᵀ``; only the seed is stored.

Tensors (layer ``out × in``, B = out / N row blocks):
- ``weight_index`` uint8 [B, tight_len(in, index_bits)] — the indices of block b's groups, column by
  column, as a bit stream padded to a whole byte per block (bitpack.pack_wide, tight)
- ``norm_code``    uint8 [B, tight_len(in, norm_bits)]
- ``norm_levels``  float16 [2**norm_bits]
``code_bits`` = (index_bits + norm_bits) / N is what ``--bits`` asks for; ``bits_per_weight`` adds the
level table and the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.formats import hadamard, pvq_index
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.bitpack import LIMB_BITS, pack_wide, tight_len, unpack_wide

MAX_DIM = 256


@FORMATS.register("pyramid")
@register_config
@dataclass(frozen=True)
class Pyramid(WeightFormat):
    dim: int = 64
    pulses: int = 39
    norm_bits: int = 8
    rotate: bool = False
    seed: int = 0

    name = "pyramid"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.dim, int) or not 2 <= self.dim <= MAX_DIM:
            raise UserError(f"PVQ vector length must be an integer from 2 to {MAX_DIM}, got {self.dim}.")
        if not isinstance(self.pulses, int) or not 1 <= self.pulses <= 4 * MAX_DIM:
            raise UserError(f"PVQ pulses K must be an integer from 1 to {4 * MAX_DIM}, got {self.pulses}.")
        if not isinstance(self.norm_bits, int) or not 1 <= self.norm_bits <= 8:
            raise UserError(f"PVQ norm bits must be an integer from 1 to 8, got {self.norm_bits}.")

    @property
    def index_bits(self) -> int:
        return pvq_index.index_bits(self.dim, self.pulses)

    @property
    def code_bits(self) -> float:
        """Bits a weight spent on indices and gain codes (the level table excluded)."""
        return (self.index_bits + self.norm_bits) / self.dim

    def describe(self) -> str:
        rot = " +hadamard" if self.rotate else ""
        return f"pvq N{self.dim} K{self.pulses} norm{self.norm_bits}b{rot} ({self.code_bits:.3f} b)"

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        if out_features % self.dim:
            raise UserError(f"PVQ vector length {self.dim} does not divide the output dimension {out_features} of "
                            f"{layer} (PVQ groups run down the columns); choose a --vector-len that divides it.")

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        B = out_features // self.dim
        return {
            "weight_index": TensorSpec((B, tight_len(in_features, self.index_bits)), torch.uint8),
            "norm_code": TensorSpec((B, tight_len(in_features, self.norm_bits)), torch.uint8),
            "norm_levels": TensorSpec((1 << self.norm_bits,), torch.float16),
        }

    # -- storage ------------------------------------------------------------------------------
    def groups(self, w: torch.Tensor) -> torch.Tensor:
        """[out, in] → [B, in, N]: group (b, j) is rows bN..bN+N−1 of column j."""
        out_f, in_f = w.shape
        return w.reshape(out_f // self.dim, self.dim, in_f).transpose(1, 2)

    def ungroup(self, g: torch.Tensor) -> torch.Tensor:
        """Inverse of ``groups``: [B, in, N] → [out, in]."""
        B, in_f, N = g.shape
        return g.transpose(1, 2).reshape(B * N, in_f)

    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fields: ``pulses`` int [out, in] (each group on the pyramid), ``norm_code`` int [B, in],
        ``norm_levels`` [2**norm_bits]."""
        g = self.groups(fields["pulses"])
        B, in_f, N = g.shape
        idx = pvq_index.encode(g.reshape(-1, N), self.pulses).reshape(B, in_f, -1)  # (B, in, L)
        code = fields["norm_code"].to(torch.int64)
        if code.min() < 0 or code.max() >= 1 << self.norm_bits:
            raise ValueError(f"norm codes out of range for {self.norm_bits} bits")
        return {
            "weight_index": pack_wide(idx if self.index_bits > LIMB_BITS else idx[..., 0], self.index_bits,
                                      tight=True),
            "norm_code": pack_wide(code, self.norm_bits, tight=True),
            "norm_levels": fields["norm_levels"].to(torch.float16).contiguous(),
        }

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        B = tensors["weight_index"].shape[0]
        idx = unpack_wide(tensors["weight_index"], self.index_bits, in_features, tight=True)
        idx = idx.reshape(B * in_features, -1)
        y = pvq_index.decode(idx, self.dim, self.pulses).reshape(B, in_features, self.dim)
        return {"pulses": self.ungroup(y), "norm_levels": tensors["norm_levels"],
                "norm_code": unpack_wide(tensors["norm_code"], self.norm_bits, in_features, tight=True)}

    def points_and_scales(self, tensors: dict[str, torch.Tensor], in_features: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pulses y [out, in], scale float32 [B, in]) with W·R = y · scale[row // N] (before ``rotate`` is undone):
        what ``dequantize`` multiplies, and what the CUDA fast path (kernels/pyramid_cuda.py) holds instead."""
        f = self.unpack(tensors, in_features)
        y = self.groups(f["pulses"].float())  # (B, in, N)
        gain = f["norm_levels"].float()[f["norm_code"]]  # (B, in)
        return f["pulses"], gain / y.norm(dim=-1)

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        pulses, scale = self.points_and_scales(tensors, in_features)
        w = self.ungroup(self.groups(pulses.float()) * scale.unsqueeze(-1))
        if self.rotate:
            w = hadamard.unrotate(w, self.seed)
        return w.to(dtype)


def project(x: torch.Tensor, k: int) -> torch.Tensor:
    """The standard greedy PVQ search: the pyramid point y (Σ|y| = k) of largest cosine with each row of
    ``x`` [G, N]. Start from ⌊k·|x|/‖x‖₁⌋ (at most N pulses short), then add the missing pulses one at a
    time where they raise the correlation ⟨|x|, y⟩ / ‖y‖ the most. A zero row gets all pulses on its
    first entry. Returns int16 [G, N] on ``x``'s device.

    The start is vectorized on ``x``'s device; the pulse loop (``_add_pulses``) runs on the host in numpy:
    it is ≤ N tiny sequential steps over few rows (PVQ calls this once per column of a layer), so
    torch's per-op overhead (and on a GPU one kernel launch per op) dominated it. One host round trip
    a call; the loop's ops are elementwise IEEE float32, so the result is the same as on the device."""
    G, N = x.shape
    ax = x.float().abs()
    l1 = ax.sum(1, keepdim=True)
    empty = ~(l1 > 0)  # zero or non-finite rows: all pulses on the first entry
    first = torch.zeros(1, N, dtype=ax.dtype, device=ax.device)
    first[0, 0] = 1.0
    ax = torch.where(empty, first, ax)
    l1 = ax.sum(1, keepdim=True)
    y = torch.floor(k * ax / l1).clamp(max=k)
    y = torch.where(y.sum(1, keepdim=True) > k, 0.0, y)  # float rounding can overshoot: start from zero
    rem = k - y.sum(1, keepdim=True)
    xy = (ax * y).sum(1, keepdim=True)
    yy = (y * y).sum(1, keepdim=True)
    host = torch.cat([ax, y, xy, yy, rem], 1).cpu().numpy()
    y = torch.from_numpy(_add_pulses(host[:, :N], host[:, N:2 * N], host[:, 2 * N], host[:, 2 * N + 1],
                                     host[:, 2 * N + 2]))
    sign = torch.where(x < 0, -1.0, 1.0)
    return (y.to(x.device) * sign).to(torch.int16)


def _add_pulses(ax: np.ndarray, y: np.ndarray, xy: np.ndarray, yy: np.ndarray, rem: np.ndarray) -> np.ndarray:
    """The greedy loop of ``project`` (float32 arrays [G, N] and [G]): add ``rem`` pulses a row, each where
    (xy + |x|ᵢ)² / (yy + 2yᵢ + 1) is largest (first index on ties). Rows sorted by ``rem`` so step t works
    on the prefix of rows still short; ``d = 2y + 1`` is kept (integers in float32 are exact)."""
    G = ax.shape[0]
    order = np.argsort(-rem, kind="stable")
    ax, xy, yy = ax[order], xy[order].copy(), yy[order].copy()
    d = 2 * y[order] + 1
    steps = np.arange(ax.shape[1] + 1, dtype=rem.dtype)
    rows = np.arange(G)
    with np.errstate(over="ignore", invalid="ignore"):  # huge rows score inf, as in float32 torch
        _pulse_steps(ax, d, xy, yy, rem, steps, rows)
    out = np.empty_like(d)
    out[order] = (d - 1) / 2
    return out


def _pulse_steps(ax, d, xy, yy, rem, steps, rows) -> None:
    for n in (rem[:, None] > steps).sum(0).tolist():  # rows still short at each step
        if n == 0:
            break
        a, dn, r = ax[:n], d[:n], rows[:n]
        score = xy[:n, None] + a
        score *= score
        score /= yy[:n, None] + dn
        i = score.argmax(1)
        xy[:n] += a[r, i]
        yy[:n] += dn[r, i]
        dn[r, i] += 2
