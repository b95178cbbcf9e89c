"""CSKV: channel shrinking — older keys and values are cached as low-rank projections.

For each layer, orthonormal bases ``U_k`` [Hkv·D, r_k] and ``U_v`` [Hkv·D, r_v] span the key / value
channels; the cache keeps the most recent ``window`` tokens at full width (the full-precision branch)
and stores older tokens as ``c = Uᵀ x`` (r channels instead of Hkv·D), reconstructing ``U c`` when
attending. Keys are projected before RoPE: the cache un-rotates incoming (rotated) keys with the
model's rotary embedding at their positions and re-rotates reconstructed ones, so the basis acts on
the channels ``k_proj`` produces.

Bases: with ``activation_aware`` the top eigenvectors of the key / value covariance over calibration
text (the optimal rank-r subspace for reconstructing the projections' outputs; equivalently the left
singular vectors of ``W·L`` with ``XᵀX = L·Lᵀ``), captured layer by layer with the shared driver;
otherwise the left singular vectors of the ``k_proj`` / ``v_proj`` weights. They live in the model
as ``self_attn.kv_basis`` buffers and so in the artifact. The layer-wise reconstruction fine-tune
of the paper is not implemented: the PCA basis already minimizes the projections' output error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.progress import NULL
from llmcomp.prune.kv.base import KV_METHODS, KVPolicy, check_ratio, check_tokens, head_dim
from llmcomp.prune.kv.cache import PolicyLayer, attention_modules, tensor_bytes


def rank_for(ratio: float, width: int) -> int:
    return max(1, round((1 - ratio) * width))


class KVBasis(nn.Module):
    """Per-layer orthonormal bases (buffers, saved in the artifact); a basis of full width is None."""

    def __init__(self, width: int, r_k: int, r_v: int, device=None, dtype=None):
        super().__init__()
        for name, r in (("k_basis", r_k), ("v_basis", r_v)):
            self.register_buffer(name, torch.empty(width, r, device=device, dtype=dtype) if r < width else None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class CSKVLayer(PolicyLayer):
    def __init__(self, layer_idx, runtime, window: int):
        super().__init__(layer_idx, runtime)
        basis = runtime.modules[layer_idx].kv_basis
        self.uk, self.uv, self.window = basis.k_basis, basis.v_basis, window
        self.clear()

    def clear(self):
        self.ck = self.cv = None  # latents [B, T_old, r] (or full-width keys/values when no basis)
        self.kw = self.vw = None  # full-width recent window [B, Hkv, <= window, D]

    def nbytes(self) -> int:
        return tensor_bytes(self.ck, self.cv, self.kw, self.vw)

    def _rope(self, n: int, start: int, like: torch.Tensor):
        """cos, sin [1 or B, 1, n, D] at cache indices ``start ..`` — what the model rotated those keys by (in a
        left-padded batch each row's own positions; the padding's do not matter, it is masked)."""
        pos = torch.arange(start, start + n, device=like.device)
        if self.shift is not None or self.lead is not None:
            pos = self.rope_positions(pos)  # [B, n]
        cos, sin = self.runtime.rope(pos, like)
        return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)

    def _shrink(self, x: torch.Tensor, basis, start: int | None) -> torch.Tensor:
        """[B, Hkv, n, D] → [B, n, r]; keys (``start`` = first position) are un-rotated first."""
        if start is not None:
            cos, sin = self._rope(x.shape[-2], start, x)
            x = (x * cos - _rotate_half(x) * sin) / (cos * cos + sin * sin)
        flat = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)  # [B, n, Hkv·D]
        return flat if basis is None else flat @ basis.to(flat.dtype)

    def _expand(self, c: torch.Tensor, basis, rotate: bool) -> torch.Tensor:
        flat = c if basis is None else c @ basis.to(c.dtype).T
        x = flat.reshape(c.shape[0], c.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotate:
            cos, sin = self._rope(x.shape[-2], 0, x)
            x = x * cos + _rotate_half(x) * sin
        return x

    def past(self):
        ks, vs = [], []
        if self.ck is not None:
            ks.append(self._expand(self.ck, self.uk, rotate=self.uk is not None))
            vs.append(self._expand(self.cv, self.uv, rotate=False))
        if self.kw is not None:
            ks.append(self.kw)
            vs.append(self.vw)
        if not ks:
            return None, None, None
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2), None

    def append(self, k, v, probs):
        self.kw = k if self.kw is None else torch.cat([self.kw, k], dim=-2)
        self.vw = v if self.vw is None else torch.cat([self.vw, v], dim=-2)
        n = self.kw.shape[-2] - self.window
        if n <= 0:
            return
        start = 0 if self.ck is None else self.ck.shape[1]
        ck = self._shrink(self.kw[..., :n, :], self.uk, start if self.uk is not None else None)
        cv = self._shrink(self.vw[..., :n, :], self.uv, None)
        self.ck = ck if self.ck is None else torch.cat([self.ck, ck], dim=1)
        self.cv = cv if self.cv is None else torch.cat([self.cv, cv], dim=1)
        self.kw, self.vw = self.kw[..., n:, :].contiguous(), self.vw[..., n:, :].contiguous()


class _Covariance:
    """Forward hook accumulating Σ yᵀy of a linear layer's outputs (float64 for the eigen-solve)."""

    def __init__(self):
        self.c = None

    def __call__(self, module, inputs, output):
        y = output.detach().reshape(-1, output.shape[-1]).double()
        self.c = y.T @ y if self.c is None else self.c + y.T @ y


def top_basis(matrix: torch.Tensor, r: int, symmetric: bool) -> torch.Tensor:
    """Top-r left singular vectors (of a weight) or eigenvectors (of a covariance), float32 [n, r]."""
    if symmetric:
        _, vecs = torch.linalg.eigh(matrix)
        return vecs[:, -r:].flip(-1).float().contiguous()
    u, _, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u[:, :r].float().contiguous()


@KV_METHODS.register("cskv")
@register_config
@dataclass(frozen=True)
class CSKVConfig(KVPolicy):
    """Low-rank key/value channels for tokens older than ``window``; ``k_ratio`` / ``v_ratio`` of the
    channels removed (0 = full width: nothing is projected)."""

    k_ratio: float = 0.5
    v_ratio: float = 0.5
    window: int = 32
    activation_aware: bool = True
    calib_samples: int = 16
    calib_seq_len: int = 512
    seed: int = 0

    method = "cskv"
    needs_calibration = True
    VERSION = 1

    def __post_init__(self):
        check_ratio("k_ratio", self.k_ratio)
        check_ratio("v_ratio", self.v_ratio)
        check_tokens("window", self.window)
        check_tokens("calib_samples", self.calib_samples, 1)
        check_tokens("calib_seq_len", self.calib_seq_len, 2)

    @property
    def calibrated_on_text(self) -> bool:
        return self.activation_aware and (self.k_ratio > 0 or self.v_ratio > 0)

    def windows(self):
        return {"window": self.window}

    def calibration_lengths(self):
        return {"calibration length": self.calib_seq_len} if self.calibrated_on_text else {}

    def ranks(self, model_config) -> tuple[int, int, int]:
        width = model_config.num_key_value_heads * head_dim(model_config)
        return width, rank_for(self.k_ratio, width), rank_for(self.v_ratio, width)

    def build_skeleton(self, model, device="meta", dtype=None) -> list[KVBasis]:
        width, r_k, r_v = self.ranks(model.config)
        dtype = dtype or next(model.parameters()).dtype
        mods = attention_modules(model)
        for m in mods:
            m.kv_basis = KVBasis(width, r_k, r_v, device=device, dtype=dtype)
        return [m.kv_basis for m in mods]

    def calibrate(self, model, tokenizer, progress=NULL, device=None):
        width, r_k, r_v = self.ranks(model.config)
        mods = attention_modules(model)
        p = next(model.parameters())
        bases = self.build_skeleton(model, device=p.device, dtype=p.dtype)
        if self.calibrated_on_text:
            from llmcomp.core.calib import calibrate_layerwise
            from llmcomp.core.data import calib_windows, check_vocab

            windows = calib_windows(tokenizer, self.calib_seq_len, self.calib_samples, self.seed)
            check_vocab(windows, model)

            def handler(path, layer, runner):
                i = next(j for j, m in enumerate(mods) if m is layer.self_attn)
                ck, cv = _Covariance(), _Covariance()
                runner.run(hooks={layer.self_attn.k_proj: ck, layer.self_attn.v_proj: cv})
                self._fill(bases[i], ck.c, cv.c, r_k, r_v, symmetric=True)

            calibrate_layerwise(model, windows, handler, batch_size=4, device=device, progress=progress)
        else:
            for m, b in zip(mods, bases):  # (a quantized projection: its dequantized weight)
                self._fill(b, _affine(m.k_proj), _affine(m.v_proj), r_k, r_v, symmetric=False)
        return self, {"width": width, "k_rank": r_k, "v_rank": r_v}

    @staticmethod
    def _fill(basis: KVBasis, k_mat, v_mat, r_k, r_v, symmetric):
        with torch.no_grad():
            if basis.k_basis is not None:
                basis.k_basis.copy_(top_basis(k_mat, r_k, symmetric))
            if basis.v_basis is not None:
                basis.v_basis.copy_(top_basis(v_mat, r_v, symmetric))

    def make_layer(self, layer_idx, runtime):
        return CSKVLayer(layer_idx, runtime, self.window)

    def describe(self) -> str:
        return f"cskv K {self.k_ratio:g} V {self.v_ratio:g} window {self.window}"


def _weight(linear) -> torch.Tensor:
    """A projection's weight [out, in]: ``nn.Linear``'s, or a quantized layer's dequantized one."""
    return linear.dequantize().detach() if hasattr(linear, "dequantize") else linear.weight.detach()


def _affine(linear) -> torch.Tensor:
    """[W | b] [out, in (+ 1)]: the keys k = W x + b lie in its column space, not W's alone where there is a bias
    (Qwen2's k/v projections; with W alone the bias's part outside W's span was lost from every key)."""
    w = _weight(linear)
    b = getattr(linear, "bias", None)
    return w if b is None else torch.cat([w, b.detach().to(w.dtype)[:, None]], 1)
