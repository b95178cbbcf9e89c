"""Bitmap-compressed sparse rows (Mustafar's KV format) and attention computed on them.

A ``BitmapRows`` holds a sparse tensor ``[..., T, D]`` (one row per cached token and head):

- ``bitmap``  uint8 [..., T, D/8] — which of the row's D entries are stored, packed 8 a byte with
  ``formats.bitpack.pack_bits(…, 1)`` (entry ``d`` is bit ``d % 8`` of byte ``d // 8``)
- ``offsets`` int32 [..., T]      — where each row's entries start in ``values`` (random access per row,
  as a kernel needs it; the rows of one ``[..., :]`` stream are consecutive)
- ``values``  [nnz] (cache dtype)  — the stored entries in row-major order of ``[..., T, D]``.

Any pattern is representable, including a different count per row; appending rows (``concat``)
keeps the row-major order, so decompression is one ``masked_scatter``.

``sparse_attention`` is the pure-torch reference of the decode kernel: scores and the weighted
value sum are computed from the stored entries alone (work and memory ∝ nnz), never from a dense copy.
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
        return torch.zeros(mask.shape, dtype=self.values.dtype, device=mask.device).masked_scatter_(mask, self.values)

    def coo(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row index into the flattened [..., T] rows, column, value) of every stored entry."""
        row, col = self.mask().reshape(-1, self.dim).nonzero(as_tuple=True)  # row-major, as ``values``
        return row, col, self.values


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    flat = counts.reshape(-1).to(torch.int64)
    return (flat.cumsum(0) - flat).to(torch.int32).reshape(counts.shape)


def compress(x: torch.Tensor, keep: torch.Tensor) -> BitmapRows:
    """Store the entries of ``x`` [..., T, D] where ``keep`` (bool, same shape) is True."""
    d = x.shape[-1]
    if d % 8:
        raise ValueError(f"bitmap rows need a head dimension divisible by 8, got {d}")
    return BitmapRows(pack_bits(keep.to(torch.uint8), 1), _offsets(keep.sum(-1)), x[keep].contiguous(), d)


def concat(a: BitmapRows | None, b: BitmapRows) -> BitmapRows:
    """Rows of ``a`` then rows of ``b`` along T, values kept in row-major order (one pass, O(nnz))."""
    if a is None:
        return b
    lead = a.offsets.shape[:-1]
    ca = _stream_counts(a)  # stored entries per [..., :] stream
    cb = _stream_counts(b)
    start = ca.cumsum(0) + cb.cumsum(0) - ca - cb  # where each stream starts in the result
    a_start, b_start = ca.cumsum(0) - ca, cb.cumsum(0) - cb
    values = torch.empty(a.values.numel() + b.values.numel(), dtype=a.values.dtype, device=a.values.device)
    dest_a = torch.arange(a.values.numel(), device=values.device) + (start - a_start).repeat_interleave(ca)
    dest_b = torch.arange(b.values.numel(), device=values.device) + (start + ca - b_start).repeat_interleave(cb)
    values[dest_a], values[dest_b] = a.values, b.values
    off_a = a.offsets + (start - a_start).to(torch.int32).reshape(*lead, 1)
    off_b = b.offsets + (start + ca - b_start).to(torch.int32).reshape(*lead, 1)
    return BitmapRows(torch.cat([a.bitmap, b.bitmap], dim=-2), torch.cat([off_a, off_b], dim=-1), values, a.dim)


def _stream_counts(r: BitmapRows) -> torch.Tensor:
    """Stored entries per stream (all leading indices but T), int64 [prod(lead)], from the offsets."""
    if r.offsets.shape[-1] == 0:
        return torch.zeros(r.offsets[..., 0].numel(), dtype=torch.int64, device=r.offsets.device)
    first = r.offsets[..., 0].reshape(-1).to(torch.int64)
    nxt = torch.cat([first[1:], first.new_tensor([r.values.numel()])])
    return nxt - first


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
    row, col, val = k.coo()  # row indexes the flattened (b, hkv, t)
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
