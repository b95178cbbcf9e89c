"""Bitmap-compressed sparse rows (Mustafar's KV format) and attention computed on them.

A ``BitmapRows`` holds a sparse tensor ``[..., T, D]`` (one row per cached token and head):

- ``bitmap``  uint8 [..., T, D/8] — which of the row's D entries are non-zero, packed 8 a byte with
  ``formats.bitpack.pack_bits(…, 1)`` (entry ``d`` is bit ``d % 8`` of byte ``d // 8``)
- ``offsets`` int32 [..., T]      — where the row's non-zeros start in ``values``
- ``values``  [nnz] (cache dtype)  — the non-zeros of each row in column order; rows need not be
  contiguous or ordered in ``values`` (appending tokens appends their values), so any sparsity
  pattern, including a different count per row, is representable.

``sparse_attention`` is the pure-torch reference of the decode kernel: scores and the weighted
value sum are computed from the non-zeros alone (work and memory ∝ nnz), never from a dense copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.formats.bitpack import pack_bits, unpack_bits


@dataclass
class BitmapRows:
    bitmap: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.offsets.shape, self.dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.bitmap, self.offsets, self.values))

    def mask(self) -> torch.Tensor:
        """bool [..., T, D]: True at stored entries."""
        return unpack_bits(self.bitmap, 1, self.dim).bool()

    def to_dense(self) -> torch.Tensor:
        mask = self.mask()
        rank = mask.to(torch.int64).cumsum(-1) - 1  # position of each entry among its row's non-zeros
        idx = (self.offsets.to(torch.int64)[..., None] + rank).clamp(min=0)
        if self.values.numel() == 0:
            return torch.zeros(mask.shape, dtype=self.values.dtype, device=self.values.device)
        idx = idx.clamp(max=self.values.numel() - 1)
        return torch.where(mask, self.values[idx], torch.zeros((), dtype=self.values.dtype, device=mask.device))

    def coo(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row index into the flattened [..., T] rows, column, value) of every stored entry."""
        mask = self.mask()
        flat = mask.reshape(-1, self.dim)
        row, col = flat.nonzero(as_tuple=True)  # row-major: each row's entries in column order
        rank = flat.to(torch.int64).cumsum(-1)[row, col] - 1
        vidx = self.offsets.reshape(-1).to(torch.int64)[row] + rank
        return row, col, self.values[vidx]


def compress(x: torch.Tensor, keep: torch.Tensor) -> BitmapRows:
    """Store the entries of ``x`` [..., T, D] where ``keep`` (bool, same shape) is True."""
    d = x.shape[-1]
    if d % 8:
        raise ValueError(f"bitmap rows need a head dimension divisible by 8, got {d}")
    counts = keep.sum(-1).reshape(-1).to(torch.int64)
    offsets = (counts.cumsum(0) - counts).to(torch.int32).reshape(keep.shape[:-1])
    return BitmapRows(pack_bits(keep.to(torch.uint8), 1), offsets, x[keep].contiguous(), d)


def concat(a: BitmapRows | None, b: BitmapRows) -> BitmapRows:
    """Rows of ``a`` then rows of ``b`` along T (``b``'s values are appended to ``a``'s)."""
    if a is None:
        return b
    return BitmapRows(torch.cat([a.bitmap, b.bitmap], dim=-2),
                      torch.cat([a.offsets, b.offsets + a.values.numel()], dim=-1),
                      torch.cat([a.values, b.values]), a.dim)


def magnitude_keep(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token magnitude pruning: keep the ``D - floor(sparsity · D)`` largest |x| of every row."""
    d = x.shape[-1]
    k = d - int(sparsity * d)
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    idx = x.abs().topk(k, dim=-1).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def sparse_scores(q: torch.Tensor, k: BitmapRows, scaling: float) -> torch.Tensor:
    """q·kᵀ from the non-zeros of ``k``. q [B, H, Q, D], k rows [B, Hkv, T, D] → [B, H, Q, T] (float32)."""
    b, h, nq, d = q.shape
    _, hkv, t, _ = k.shape
    g = h // hkv
    row, col, val = k.coo()  # row indexes (b, hkv, t)
    bh = row // t
    qg = q.float().reshape(b * hkv, g * nq, d)  # query heads of each KV head, grouped
    contrib = qg[bh, :, col] * val.float()[:, None]  # [nnz, G·Q]
    s = torch.zeros(b * hkv * t, g * nq, dtype=torch.float32, device=q.device).index_add_(0, row, contrib)
    return (s.reshape(b, hkv, t, g, nq).permute(0, 1, 3, 4, 2).reshape(b, h, nq, t)) * scaling


def sparse_weighted_sum(p: torch.Tensor, v: BitmapRows) -> torch.Tensor:
    """p @ v from the non-zeros of ``v``. p [B, H, Q, T], v rows [B, Hkv, T, D] → [B, H, Q, D] (float32)."""
    b, h, nq, t = p.shape
    hkv, d = v.shape[1], v.dim
    g = h // hkv
    row, col, val = v.coo()
    bh, tok = row // t, row % t
    pg = p.float().reshape(b, hkv, g * nq, t).reshape(b * hkv, g * nq, t)
    contrib = pg[bh, :, tok] * val.float()[:, None]  # [nnz, G·Q]
    out = torch.zeros(b * hkv * d, g * nq, dtype=torch.float32, device=p.device)
    out.index_add_(0, bh * d + col, contrib)
    return out.reshape(b, hkv, d, g, nq).permute(0, 1, 3, 4, 2).reshape(b, h, nq, d)


def sparse_attention(q: torch.Tensor, k: BitmapRows, v: BitmapRows, k_new: torch.Tensor, v_new: torch.Tensor,
                     past_mask: torch.Tensor | None, new_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention over compressed past rows plus dense new tokens, computed on the compressed format.

    q [B, H, Q, D]; k, v: compressed [B, Hkv, T, D]; k_new, v_new [B, Hkv, Q', D]; masks bool
    broadcastable to [B, H, Q, T] / [B, H, Q, Q'] (None = all allowed). Returns [B, H, Q, D] in q's dtype."""
    from llmcomp.prune.kv.attention import repeat_kv

    n_rep = q.shape[1] // k_new.shape[1]
    s_past = sparse_scores(q, k, scaling)
    s_new = torch.matmul(q.float(), repeat_kv(k_new, n_rep).float().transpose(2, 3)) * scaling
    neg = torch.finfo(torch.float32).min
    if past_mask is not None:
        s_past = s_past.masked_fill(~past_mask, neg)
    if new_mask is not None:
        s_new = s_new.masked_fill(~new_mask, neg)
    p = torch.softmax(torch.cat([s_past, s_new], dim=-1), dim=-1)
    t = s_past.shape[-1]
    out = sparse_weighted_sum(p[..., :t], v) + torch.matmul(p[..., t:], repeat_kv(v_new, n_rep).float())
    return out.to(q.dtype)
