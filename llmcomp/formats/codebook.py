"""``codebook``: vector quantization with learned codebooks (VPTQ / AQLM family).

A row's weights are cut into vectors of ``dim`` consecutive inputs; each vector is the sum of one
entry from every stage's codebook (residual VQ), times an optional per-output-channel scale:

    ŵ[o, vec j] = s[o] · Σ_t C_t[g(j), idx_t[o, j]]

- ``bits`` = index bits of each stage, e.g. (8,) or (8, 4): stage t has 2**bits[t] entries of ``dim``
  float16 values; ``group`` = input columns sharing one codebook (0: one codebook per layer), so
  g(j) = (j · dim) // group, a ragged last group allowed;
- ``outliers`` = fraction of input columns (rounded to whole vectors) kept apart: ``outlier_cols``
  lists them, and their vectors (consecutive outlier columns, ``dim`` at a time) index one codebook of
  their own with ``outlier_bits`` bits. The other columns, in ascending order, form the main vectors.

Tensors (layer ``out × in``; M = in − n_outlier_cols main columns, nv = M / dim):
- ``index{t}``          uint8 [out, tight_len(nv, bits[t])]   (bitpack.pack_wide, tight: each row padded to a byte)
- ``codebook{t}``       float16 [n_groups, 2**bits[t], dim]
- ``weight_scale``      float16 [out]                                      — with ``scale``
- ``outlier_cols``      int32 [n_oc]                                       — with ``outliers``
- ``outlier_index``     uint8 [out, tight_len(n_oc / dim, outlier_bits)]
- ``outlier_codebook``  float16 [2**outlier_bits, dim]
``bits_per_weight`` is the exact storage: indices plus the codebooks amortized over the layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.bitpack import pack_wide, tight_len, unpack_wide

CODEBOOK_DTYPE = torch.float16
MAX_STAGE_BITS = 16


@FORMATS.register("codebook")
@register_config
@dataclass(frozen=True)
class Codebook(WeightFormat):
    dim: int = 4
    bits: tuple = (8,)
    group: int = 0
    scale: bool = True
    outliers: float = 0.0
    outlier_bits: int = 8

    name = "codebook"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 64:
            raise UserError(f"VQ vector length must be an integer from 1 to 64, got {self.dim}.")
        object.__setattr__(self, "bits", tuple(self.bits))
        if not self.bits or any(not isinstance(b, int) or not 1 <= b <= MAX_STAGE_BITS for b in self.bits):
            raise UserError(f"VQ stage index bits must be integers from 1 to {MAX_STAGE_BITS}, got {list(self.bits)}.")
        if not isinstance(self.group, int) or self.group < 0 or self.group % self.dim:
            raise UserError(f"VQ codebook group must be 0 (one per layer) or a multiple of the vector length "
                            f"{self.dim}, got {self.group}.")
        if not 0 <= self.outliers < 0.5:
            raise UserError(f"VQ outlier columns must be a fraction in [0, 0.5), got {self.outliers}.")
        if not isinstance(self.outlier_bits, int) or not 1 <= self.outlier_bits <= MAX_STAGE_BITS:
            raise UserError(f"VQ outlier index bits must be an integer from 1 to {MAX_STAGE_BITS}, "
                            f"got {self.outlier_bits}.")

    # -- geometry -------------------------------------------------------------------------------
    @property
    def code_bits(self) -> float:
        """Index bits a weight (what ``--bits`` asks for); codebooks and scales come on top."""
        return sum(self.bits) / self.dim

    def n_outlier_cols(self, in_features: int) -> int:
        return int(round(self.outliers * in_features / self.dim)) * self.dim

    def n_main(self, in_features: int) -> int:
        return in_features - self.n_outlier_cols(in_features)

    def n_groups(self, in_features: int) -> int:
        m = self.n_main(in_features)
        return 1 if not self.group else max(1, -(-m // self.group))

    def vector_group(self, in_features: int, device=None) -> torch.Tensor:
        """Codebook group of each main vector, int64 [nv]."""
        nv = self.n_main(in_features) // self.dim
        j = torch.arange(nv, device=device)
        return torch.zeros_like(j) if not self.group else j * self.dim // self.group

    def describe(self) -> str:
        stages = "+".join(str(b) for b in self.bits)
        extra = f" g{self.group}" if self.group else ""
        extra += f" +{100 * self.outliers:g}% outlier cols" if self.outliers else ""
        return f"vq v{self.dim} {stages}b{extra} ({self.code_bits:g} b)"

    def fitted(self, out_features: int, in_features: int) -> "Codebook":
        """This format with its outlier codebook no larger than the layer's outlier vectors: on a narrow layer
        (SmolLM2's 192 × 576 k/v projections) 1 % of the columns makes 192 vectors, fewer than 2⁸ entries. Each
        layer's format is stored with it, so the layer keeps the bits it got."""
        count = out_features * self.n_outlier_cols(in_features) // self.dim
        if count >= 2 and (1 << self.outlier_bits) > count:
            return dataclasses.replace(self, outlier_bits=count.bit_length() - 1)
        return self

    def validate_shape(self, out_features: int, in_features: int, layer: str) -> None:
        if in_features % self.dim:
            raise UserError(f"VQ vector length {self.dim} does not divide the input dimension {in_features} of "
                            f"{layer}; choose a --vector-len that divides it.")
        m = self.n_main(in_features)
        smallest = (m % self.group or min(self.group, m)) if self.group else m  # (a ragged last group is smaller)
        per_group = out_features * smallest // self.dim
        if (1 << max(self.bits)) > per_group:
            raise UserError(f"VQ codebook of {1 << max(self.bits)} entries is larger than the {per_group} vectors it "
                            f"would be fitted on in {layer}; use fewer index bits or a longer vector.")
        n_oc = self.n_outlier_cols(in_features)
        if self.outliers and (n_oc == 0 or n_oc == in_features):
            raise UserError(f"VQ outlier fraction {self.outliers:g} gives {n_oc} of {in_features} columns in {layer}; "
                            "choose a fraction that keeps some columns on each side.")
        if n_oc and (1 << self.outlier_bits) > out_features * n_oc // self.dim:
            raise UserError(f"VQ outlier codebook of {1 << self.outlier_bits} entries is larger than the "
                            f"{out_features * n_oc // self.dim} outlier vectors of {layer}; use a larger --outliers "
                            "fraction.")

    def param_specs(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        nv = self.n_main(in_features) // self.dim
        ng = self.n_groups(in_features)
        specs = {}
        for t, b in enumerate(self.bits):
            specs[f"index{t}"] = TensorSpec((out_features, tight_len(nv, b)), torch.uint8)
            specs[f"codebook{t}"] = TensorSpec((ng, 1 << b, self.dim), CODEBOOK_DTYPE)
        if self.scale:
            specs["weight_scale"] = TensorSpec((out_features,), torch.float16)
        n_oc = self.n_outlier_cols(in_features)
        if n_oc:
            specs["outlier_cols"] = TensorSpec((n_oc,), torch.int32)
            specs["outlier_index"] = TensorSpec((out_features, tight_len(n_oc // self.dim, self.outlier_bits)),
                                                torch.uint8)
            specs["outlier_codebook"] = TensorSpec((1 << self.outlier_bits, self.dim), CODEBOOK_DTYPE)
        return specs

    # -- storage ----------------------------------------------------------------------------
    def pack(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fields: ``index{t}`` int [out, nv], ``codebook{t}`` [n_groups, 2**bits[t], dim], ``scale`` [out]
        (with ``scale``), and with outliers ``outlier_cols`` [n_oc] (ascending), ``outlier_index``
        [out, n_oc / dim], ``outlier_codebook`` [2**outlier_bits, dim]."""
        out = {}
        for t, b in enumerate(self.bits):
            idx = fields[f"index{t}"].to(torch.int64)
            if idx.min() < 0 or idx.max() >= 1 << b:
                raise ValueError(f"stage {t} indices out of range for {b} bits")
            out[f"index{t}"] = pack_wide(idx, b, tight=True)
            out[f"codebook{t}"] = fields[f"codebook{t}"].to(CODEBOOK_DTYPE).contiguous()
        if self.scale:
            out["weight_scale"] = fields["scale"].to(torch.float16).contiguous()
        if "outlier_cols" in fields and fields["outlier_cols"].numel():
            cols = fields["outlier_cols"].to(torch.int64)
            if bool((cols[1:] <= cols[:-1]).any()):
                raise ValueError("outlier columns must be strictly ascending")
            out["outlier_cols"] = cols.to(torch.int32).contiguous()
            out["outlier_index"] = pack_wide(fields["outlier_index"].to(torch.int64), self.outlier_bits, tight=True)
            out["outlier_codebook"] = fields["outlier_codebook"].to(CODEBOOK_DTYPE).contiguous()
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
        nv = self.n_main(in_features) // self.dim
        fields = {}
        for t, b in enumerate(self.bits):
            fields[f"index{t}"] = unpack_wide(tensors[f"index{t}"], b, nv, tight=True)
            fields[f"codebook{t}"] = tensors[f"codebook{t}"]
        if self.scale:
            fields["scale"] = tensors["weight_scale"]
        n_oc = self.n_outlier_cols(in_features)
        if n_oc:
            fields["outlier_cols"] = tensors["outlier_cols"]
            fields["outlier_index"] = unpack_wide(tensors["outlier_index"], self.outlier_bits, n_oc // self.dim,
                                                  tight=True)
            fields["outlier_codebook"] = tensors["outlier_codebook"]
        return fields

    def main_cols(self, outlier_cols: torch.Tensor | None, in_features: int, device=None) -> torch.Tensor:
        """The main (non-outlier) input columns in ascending order, int64 [M]."""
        keep = torch.ones(in_features, dtype=torch.bool, device=device)
        if outlier_cols is not None:
            keep[outlier_cols.to(torch.int64)] = False
        return keep.nonzero().squeeze(1)

    @staticmethod
    def outlier_weights(fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """The outlier columns' weights float32 [out, n_oc] (before the per-channel scale) from unpacked fields."""
        outl = fields["outlier_codebook"].float()[fields["outlier_index"].to(torch.int64)]  # (out, n_oc / dim, dim)
        return outl.reshape(outl.shape[0], -1)

    def dequantize(self, tensors: dict[str, torch.Tensor], in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f = self.unpack(tensors, in_features)
        idx0 = f["index0"]
        out_f, nv = idx0.shape
        grp = self.vector_group(in_features, idx0.device)  # (nv,)
        main = torch.zeros(out_f, nv, self.dim, device=idx0.device)
        for t, b in enumerate(self.bits):  # gather + sum of residual stages
            flat = f[f"codebook{t}"].float().reshape(-1, self.dim)
            main += flat[grp * (1 << b) + f[f"index{t}"]]
        if "outlier_cols" not in f:
            w = main.reshape(out_f, in_features)
        else:
            w = torch.empty(out_f, in_features, device=idx0.device)
            w[:, self.main_cols(f["outlier_cols"], in_features, idx0.device)] = main.reshape(out_f, -1)
            w[:, f["outlier_cols"].to(torch.int64)] = self.outlier_weights(f)
        if self.scale:
            w = w * f["scale"].float()[:, None]
        return w.to(dtype)
