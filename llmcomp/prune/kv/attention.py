"""Attention math shared by every KV policy: the eager reference and mask helpers.

``eager_attention`` mirrors transformers' ``eager_attention_forward`` operation for operation
(repeat_kv, matmul, additive mask, float32 softmax, matmul), so a policy that holds the exact keys
and values reproduces the eager dense model bit for bit, and it returns the attention
probabilities that the scored eviction policies (H2O, A2SF) accumulate.

Shapes: queries ``[B, H, Q, D]``; keys / values ``[B, Hkv, T, D]`` with ``H = G · Hkv`` (GQA, query
head ``h`` reads KV head ``h // G``); boolean masks are True where attention is allowed.
"""
from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] → [B, Hkv·n_rep, T, D] (each KV head repeated for its query heads)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Boolean mask → additive float mask (0 where allowed, the dtype's min elsewhere), as HF's eager mask."""
    if mask is None:
        return None
    zero = torch.tensor(0.0, device=mask.device, dtype=dtype)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention. ``mask``: bool broadcastable to [B, H, Q, T] or None (all allowed).

    Returns (output [B, H, Q, D], probabilities [B, H, Q, T])."""
    n_rep = q.shape[1] // k.shape[1]
    w = torch.matmul(q, repeat_kv(k, n_rep).transpose(2, 3)) * scaling
    add = additive(mask, q.dtype)
    if add is not None:
        w = w + add
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, repeat_kv(v, n_rep)), w


def split_mask(mask: torch.Tensor | None, past: int, q_len: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Cut HF's logical causal mask [B, 1, Q, past + Q] into its past-token and new-token blocks.

    ``None`` (SDPA's "plain causal, no padding" shortcut) becomes an all-allowed past block (None) and a
    lower-triangular new block."""
    if mask is None:
        return None, torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None, None]
    if mask.dtype != torch.bool:  # an additive float mask from another mask interface
        mask = mask == 0
    return mask[..., :past], mask[..., past:past + q_len]


def gather_past_mask(past_mask: torch.Tensor | None, positions: torch.Tensor | None, n_rep: int
                     ) -> torch.Tensor | None:
    """Columns of the logical past mask [B, 1, Q, seen] for the tokens a layer still holds.

    ``positions``: int [P] (same tokens for every head) or [B, Hkv, P] (per head). Returns a mask
    broadcastable to [B, H, Q, P] (H = Hkv · n_rep), or None when everything is allowed."""
    if past_mask is None:
        return None
    if positions is None:
        return past_mask
    positions = positions.long()
    if positions.dim() == 1:
        return past_mask[..., positions]
    b, hkv, p = positions.shape
    q = past_mask.shape[-2]
    src = past_mask.expand(b, hkv, q, past_mask.shape[-1])
    out = src.gather(-1, positions[:, :, None, :].expand(b, hkv, q, p))
    return repeat_kv(out, n_rep)
