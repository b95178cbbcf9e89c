"""Mustafar: per-token magnitude pruning of K and V, stored as bitmap-compressed rows.

Every cached token's key (and value) vector of one head keeps its ``D - floor(s·D)`` largest-magnitude
entries (``s`` = ``k_sparsity`` / ``v_sparsity``); the most recent ``window`` tokens stay dense. After a
prefill (or any multi-token chunk) everything older is pruned at once; decode steps prune in blocks,
when the dense part reaches ``2·window`` tokens, so that appending to the compressed rows (an O(nnz)
copy) happens once per ``window`` steps. Pruned rows are held in the bitmap format of ``bitmap.py``, which is
what the cache's byte count measures.

Attention paths (``kernel``): ``dense`` decompresses the held rows and runs the eager reference
(bit-exact with the dense model at sparsity 0), ``sparse`` computes scores and the value sum from the
non-zeros (the pure-torch reference of the GPU kernel), ``triton`` is the GPU decode kernel
(kernels in ``mustafar_triton.py``; one query token, CUDA), and ``auto`` picks ``triton`` for decode
steps on a CUDA device with Triton installed and ``dense`` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.prune.kv import bitmap
from llmcomp.prune.kv.attention import split_mask
from llmcomp.prune.kv.base import KV_METHODS, KVPolicy, check_ratio, check_tokens, head_dim
from llmcomp.prune.kv.cache import PolicyLayer, cat_masks, tensor_bytes

KERNELS = ("auto", "dense", "sparse", "triton")


def _triton_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class MustafarLayer(PolicyLayer):
    def __init__(self, layer_idx, runtime, cfg: "MustafarConfig"):
        super().__init__(layer_idx, runtime)
        self.cfg = cfg
        self.clear()

    def clear(self):
        self.ks = self.vs = None  # BitmapRows [B, Hkv, T_sparse, D]
        self.kw = self.vw = None  # dense recent window [B, Hkv, <= window, D]

    def nbytes(self) -> int:
        sparse = sum(r.nbytes() for r in (self.ks, self.vs) if r is not None)
        return sparse + tensor_bytes(self.kw, self.vw)

    def past(self):
        if self.ks is None:
            return self.kw, self.vw, None
        k, v = self.ks.to_dense(), self.vs.to_dense()
        if self.kw is not None and self.kw.shape[-2]:
            k, v = torch.cat([k, self.kw], dim=-2), torch.cat([v, self.vw], dim=-2)
        return k, v, None

    def append(self, k, v, probs):
        self.kw = k if self.kw is None else torch.cat([self.kw, k], dim=-2)
        self.vw = v if self.vw is None else torch.cat([self.vw, v], dim=-2)
        n = self.kw.shape[-2] - self.cfg.window
        if n <= 0 or (self.kw.shape[-2] <= 2 * self.cfg.window and k.shape[-2] == 1):
            return  # decode steps prune in blocks: the dense part holds window .. 2·window tokens
        old_k, old_v = self.kw[..., :n, :], self.vw[..., :n, :]
        self.ks = bitmap.concat(self.ks, bitmap.compress(old_k, bitmap.magnitude_keep(old_k, self.cfg.k_sparsity)))
        self.vs = bitmap.concat(self.vs, bitmap.compress(old_v, bitmap.magnitude_keep(old_v, self.cfg.v_sparsity)))
        self.kw, self.vw = self.kw[..., n:, :].contiguous(), self.vw[..., n:, :].contiguous()

    def _kernel(self, q: torch.Tensor) -> str:
        kernel = self.cfg.kernel
        if kernel == "auto":
            small = q.shape[2] == 1 and q.dtype in (torch.float16, torch.bfloat16) and triton_head_dim(q.shape[-1])
            kernel = "triton" if small and _triton_available(q.device) else "dense"
        return kernel

    def compute(self, module, q, k_new, v_new, mask, scaling):
        kernel = self._kernel(q)
        if self.ks is None or kernel == "dense":
            return super().compute(module, q, k_new, v_new, mask, scaling)
        t = self.ks.shape[-2]
        past_mask, new_mask = split_mask(mask, self.seen, q.shape[2], q.device)
        kd = k_new if self.kw is None else torch.cat([self.kw, k_new], dim=-2)
        vd = v_new if self.vw is None else torch.cat([self.vw, v_new], dim=-2)
        # the held window is visible like any past token: its mask columns are t .. t+window-1
        sparse_mask = None if past_mask is None else past_mask[..., :t]
        window_mask = None if past_mask is None else past_mask[..., t:]
        dense_mask = new_mask if self.kw is None else cat_masks(window_mask, new_mask, self.kw.shape[-2])
        if kernel == "triton":
            from llmcomp.prune.kv.mustafar_triton import sparse_decode_attention

            if q.shape[2] != 1:
                raise UserError("The Triton Mustafar kernel handles one query token (decode); use kernel 'auto'.")
            out = sparse_decode_attention(q, self.ks, self.vs, kd, vd, sparse_mask, dense_mask, scaling)
        else:
            out = bitmap.sparse_attention(q, self.ks, self.vs, kd, vd, sparse_mask, dense_mask, scaling)
        self.append(k_new, v_new, None)
        return out.transpose(1, 2).contiguous()


def triton_head_dim(d: int) -> bool:
    """Head dimensions the Triton decode kernel takes (``mustafar_triton.sparse_decode_attention``); ``auto`` picks
    the reference elsewhere (it picked Triton for any, and e.g. a head dim of 96 raised at the first decode step)."""
    return d & (d - 1) == 0 and 16 <= d <= 256


@KV_METHODS.register("mustafar")
@register_config
@dataclass(frozen=True)
class MustafarConfig(KVPolicy):
    """Unstructured per-token magnitude sparsity of K and V with a dense recent window."""

    k_sparsity: float = 0.5
    v_sparsity: float = 0.5
    window: int = 32
    kernel: str = "auto"

    method = "mustafar"
    VERSION = 1

    def __post_init__(self):
        check_ratio("k_sparsity", self.k_sparsity)
        check_ratio("v_sparsity", self.v_sparsity)
        check_tokens("window", self.window)
        if self.kernel not in KERNELS:
            raise UserError(f"Unknown Mustafar kernel {self.kernel!r}; choose one of: {', '.join(KERNELS)}.")

    def windows(self):
        return {"window": self.window}

    def validate_for(self, model_config, context=None):
        super().validate_for(model_config, context)
        if head_dim(model_config) % 8:
            raise UserError(f"mustafar stores one bitmap byte per 8 channels; head dimension {head_dim(model_config)} "
                            "is not a multiple of 8.")
        if self.kernel == "triton" and not triton_head_dim(head_dim(model_config)):
            raise UserError(f"The Triton Mustafar kernel needs a power-of-two head dimension from 16 to 256, not "
                            f"{head_dim(model_config)}; use kernel 'auto' (it takes the reference there).")

    def make_layer(self, layer_idx, runtime):
        return MustafarLayer(layer_idx, runtime, self)

    def describe(self) -> str:
        return f"mustafar K {self.k_sparsity:g} V {self.v_sparsity:g} window {self.window}"
