"""``pyramid``: pyramid vector quantization (PVQ) of groups of ``dim`` weights along the input dimension.

Each group w (N = ``dim`` consecutive weights of one row) is stored as a gain and a direction:

    ŵ = s[o] · level[c] · y / ‖y‖₂,     y ∈ P(N, K) = {y ∈ ℤᴺ : Σ|yᵢ| = K}

- the direction is a point y of the pyramid with K = ``pulses`` unit pulses, stored as its exact
  enumeration index (pvq_index.py): ⌈log₂ V(N, K)⌉ bits a group, no codebook in memory;
- the gain is a ``norm_bits`` code into ``norm_levels`` (float16, one small table a layer, fitted by
  the quantizer: a distribution-optimal 1-D quantizer of the gains);
- ``s`` (optional) is a float16 scale per output channel, so one gain table fits every row.
With ``rotate`` the stored weights are ``W·R`` for a seeded random Hadamard ``R`` (hadamard.py) and
dequantize applies ``Rᵀ``; only the seed is stored.

Tensors (layer ``out × in``, G = in / N groups a row):
- ``weight_index`` uint8 [out, tight_len(G, index_bits)] — the indices as a bit stream, each row padded
  to a whole byte only (bitpack.pack_wide, tight)
- ``norm_code``    uint8 [out, tight_len(G, norm_bits)]
- ``norm_levels``  float16 [2**norm_bits]
- ``weight_scale`` float16 [out]                         — only with ``scale``
``code_bits`` = (index_bits + norm_bits) / N is what ``--bits`` asks for; ``bits_per_weight`` adds the
scale and the level table.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    scale: bool = True
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
        """Bits a weight spent on indices and gain codes (scales and the level table excluded)."""
        return (self.index_bits + self.norm_bits) / self.dim

    def describe(self) -> str:
        rot = " +hadamard" if self.rotate else ""
        return f"pvq N{self.dim} K{self.pulses} norm{self.norm_bits}b{rot} ({self.code_bits:.3f} b)"

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        if in_features % self.dim:
            raise UserError(f"PVQ vector length {self.dim} does not divide the input dimension {in_features} of "
                            f"{layer}; choose a --vector-len that divides it.")

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        G = in_features // self.dim
        specs = {
            "weight_index": TensorSpec((out_features, tight_len(G, self.index_bits)), torch.uint8),
            "norm_code": TensorSpec((out_features, tight_len(G, self.norm_bits)), torch.uint8),
            "norm_levels": TensorSpec((1 << self.norm_bits,), torch.float16),
        }
        if self.scale:
            specs["weight_scale"] = TensorSpec((out_features,), torch.float16)
        return specs

    # -- storage ------------------------------------------------------------------------------
    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fields: ``pulses`` int [out, in] (each group of ``dim`` on the pyramid), ``norm_code`` int
        [out, G], ``norm_levels`` [2**norm_bits], ``scale`` [out] (with ``scale``)."""
        y = fields["pulses"]
        out_f, in_f = y.shape
        G = in_f // self.dim
        idx = pvq_index.encode(y.reshape(out_f * G, self.dim), self.pulses)  # (out·G, L)
        idx = idx.reshape(out_f, G, -1)
        code = fields["norm_code"].to(torch.int64)
        if code.min() < 0 or code.max() >= 1 << self.norm_bits:
            raise ValueError(f"norm codes out of range for {self.norm_bits} bits")
        out = {
            "weight_index": pack_wide(idx if self.index_bits > LIMB_BITS else idx[..., 0], self.index_bits, tight=True),
            "norm_code": pack_wide(code, self.norm_bits, tight=True),
            "norm_levels": fields["norm_levels"].to(torch.float16).contiguous(),
        }
        if self.scale:
            out["weight_scale"] = fields["scale"].to(torch.float16).contiguous()
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        out_f = tensors["weight_index"].shape[0]
        G = in_features // self.dim
        idx = unpack_wide(tensors["weight_index"], self.index_bits, G, tight=True)
        idx = idx.reshape(out_f * G, -1) if idx.dim() == 3 else idx.reshape(out_f * G, 1)
        y = pvq_index.decode(idx, self.dim, self.pulses).reshape(out_f, in_features)
        fields = {"pulses": y, "norm_code": unpack_wide(tensors["norm_code"], self.norm_bits, G, tight=True),
                  "norm_levels": tensors["norm_levels"]}
        if self.scale:
            fields["scale"] = tensors["weight_scale"]
        return fields

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f = self.unpack(tensors, in_features)
        out_f = f["pulses"].shape[0]
        y = f["pulses"].float().reshape(out_f, -1, self.dim)  # (out, G, N)
        gain = f["norm_levels"].float()[f["norm_code"]]  # (out, G)
        w = (y * (gain / y.norm(dim=-1)).unsqueeze(-1)).reshape(out_f, in_features)
        if self.scale:
            w = w * f["scale"].float()[:, None]
        if self.rotate:
            w = hadamard.unrotate(w, self.seed)
        return w.to(dtype)


def project(x: torch.Tensor, k: int) -> torch.Tensor:
    """The standard greedy PVQ search: the pyramid point y (Σ|y| = k) of largest cosine with each row of
    ``x`` [G, N]. Start from ⌊k·|x|/‖x‖₁⌋ (at most N pulses short), then add the missing pulses one at a
    time where they raise the correlation ⟨|x|, y⟩ / ‖y‖ the most. Vectorized over rows; the loop runs
    over the ≤ N missing pulses. A zero row gets all pulses on its first entry. Returns int16 [G, N]."""
    G, N = x.shape
    ax = x.float().abs()
    l1 = ax.sum(1, keepdim=True)
    empty = ~(l1[:, 0] > 0)  # zero or non-finite rows
    if bool(empty.any()):
        ax = ax.clone()
        ax[empty] = 0.0
        ax[empty, 0] = 1.0
        l1 = ax.sum(1, keepdim=True)
    y = torch.floor(k * ax / l1).clamp(max=k)
    over = y.sum(1) > k  # float rounding can overshoot by a pulse: start those rows from zero
    y[over] = 0
    rem = k - y.sum(1)
    xy = (ax * y).sum(1)
    yy = (y * y).sum(1)
    rows = torch.arange(G, device=x.device)
    for _ in range(int(rem.max()) if G else 0):
        active = (rem > 0).float()
        score = (xy[:, None] + ax) ** 2 / (yy[:, None] + 2 * y + 1)
        i = score.argmax(1)
        yi = y[rows, i]
        y[rows, i] = yi + active
        xy = xy + active * ax[rows, i]
        yy = yy + active * (2 * yi + 1)
        rem = rem - active
    sign = torch.where(x < 0, -1.0, 1.0)
    return (y * sign).to(torch.int16)
