"""KIVI: 2-, 3-, 4- or 8-bit KV cache — keys quantized per channel, values per token, recent tokens full precision.

Keys: tokens collect in a full-precision residual; whenever it holds ``residual`` tokens they are
quantized per channel, with one scale/minimum per channel and group of ``group`` consecutive tokens
(key outliers are channel-wise, so grouping along tokens keeps them in their own range). Values: the
last ``residual`` tokens stay full precision; older ones are quantized per token in groups of
``group`` channels. Codes are min-max asymmetric (``x ≈ code · scale + min``; scale and min float16),
bit-packed with ``formats.bitpack`` (the same packing as the weight formats). The zero-including grid
of ``formats.uniform`` is not used: KV channels often lie far from zero, where it wastes levels.
With ``residual`` ≥ the sequence nothing is quantized (the cache is exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.formats.bitpack import pack_bits, unpack_bits
from llmcomp.prune.kv.base import KV_METHODS, KVPolicy, check_tokens, head_dim
from llmcomp.prune.kv.cache import PolicyLayer, tensor_bytes

SCALE_DTYPE = torch.float16


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize each row of ``x`` [..., n]. Returns (packed uint8 [..., n·bits/8], scale [...], min [...])."""
    maxq = (1 << bits) - 1
    x = x.float()
    lo = x.amin(-1).to(SCALE_DTYPE)
    scale = ((x.amax(-1) - lo.float()) / maxq).clamp(min=1e-6).to(SCALE_DTYPE)
    codes = torch.round((x - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, maxq)
    return pack_bits(codes.to(torch.uint8), bits), scale, lo


def dequantize_rows(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, bits: int, n: int,
                    dtype: torch.dtype) -> torch.Tensor:
    codes = unpack_bits(packed, bits, n).float()
    return (codes * scale.float()[..., None] + lo.float()[..., None]).to(dtype)


class KIVILayer(PolicyLayer):
    def __init__(self, layer_idx, runtime, cfg: "KIVIConfig"):
        super().__init__(layer_idx, runtime)
        self.cfg = cfg
        self.clear()

    def clear(self):
        self.kq = self.vq = None  # (packed, scale, min): keys [B, Hkv, n_groups, D, ·], values [B, Hkv, T, D/g, ·]
        self.kr = self.vr = None  # full-precision residuals [B, Hkv, r, D]

    def nbytes(self) -> int:
        return tensor_bytes(*(self.kq or ()), *(self.vq or ()), self.kr, self.vr)

    def past(self):
        g, bits = self.cfg.group, self.cfg.bits
        ks, vs = [], []
        if self.kq is not None:
            k = dequantize_rows(*self.kq, bits, g, self.dtype)  # [B, Hkv, ng, D, g]
            ks.append(k.transpose(-1, -2).reshape(k.shape[0], k.shape[1], -1, k.shape[3]))
        if self.vq is not None:
            v = dequantize_rows(*self.vq, bits, g, self.dtype)  # [B, Hkv, T, D/g, g]
            vs.append(v.reshape(*v.shape[:3], -1))
        ks += [self.kr] if self.kr is not None else []
        vs += [self.vr] if self.vr is not None else []
        if not ks:
            return None, None, None
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), None

    @staticmethod
    def _cat(store, new, dim):
        return new if store is None else tuple(torch.cat([a, b], dim=dim) for a, b in zip(store, new))

    def append(self, k, v, probs):
        g, bits, r = self.cfg.group, self.cfg.bits, self.cfg.residual
        if k.shape[-1] % g:
            raise UserError(f"kivi: group {g} does not divide the head dimension {k.shape[-1]}.")
        self.kr = k if self.kr is None else torch.cat([self.kr, k], dim=-2)
        self.vr = v if self.vr is None else torch.cat([self.vr, v], dim=-2)
        n = self.kr.shape[-2] // r * r
        if n:
            blk = self.kr[..., :n, :]
            b, h, _, d = blk.shape
            rows = blk.reshape(b, h, n // g, g, d).transpose(-1, -2)  # [B, Hkv, ng, D, g]: per channel
            self.kq = self._cat(self.kq, quantize_rows(rows, bits), 2)
            self.kr = self.kr[..., n:, :].contiguous()
        n = self.vr.shape[-2] - r
        if n > 0:
            blk = self.vr[..., :n, :]
            rows = blk.reshape(*blk.shape[:3], -1, g)  # [B, Hkv, n, D/g, g]: per token
            self.vq = self._cat(self.vq, quantize_rows(rows, bits), 2)
            self.vr = self.vr[..., n:, :].contiguous()


@KV_METHODS.register("kivi")
@register_config
@dataclass(frozen=True)
class KIVIConfig(KVPolicy):
    """2-, 3-, 4- or 8-bit KV cache (the paper: 2 and 4): keys per channel, values per token, ``residual`` recent
    tokens unquantized."""

    bits: int = 2
    group: int = 32
    residual: int = 128

    method = "kivi"
    VERSION = 1

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise UserError(f"--bits for kivi must be 2, 3, 4 or 8, got {self.bits!r}.")
        check_tokens("group", self.group, 1)
        check_tokens("residual", self.residual, 1)
        if self.residual % self.group:
            raise UserError(f"residual ({self.residual}) must be a multiple of the kivi group ({self.group}): "
                            "keys are quantized in whole token groups.")  # (the field first: the CLI names its flag)

    def windows(self):
        return {"residual window": self.residual}  # (the recent tokens kept in full precision; --window)

    def validate_for(self, model_config, context=None):
        super().validate_for(model_config, context)
        if head_dim(model_config) % self.group:
            raise UserError(f"kivi group {self.group} does not divide the head dimension {head_dim(model_config)}.")

    def make_layer(self, layer_idx, runtime):
        return KIVILayer(layer_idx, runtime, self)

    def describe(self) -> str:
        return f"kivi {self.bits}-bit g{self.group} residual {self.residual}"
