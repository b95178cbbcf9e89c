"""Triton decode kernel for Mustafar's bitmap-compressed KV cache (CUDA; one query token).

One program per (batch, query head) streams its KV head's compressed rows in blocks of ``BLOCK_T``
tokens: it loads each row's bitmap bytes and offset, expands them in registers (prefix count of the
set bits → index into ``values``), gathers the stored key entries, computes the scores, and keeps an
online softmax (running max ``m``, sum ``l``) and the weighted value sum of the decompressed value
rows. Only the compressed bytes are read from memory. The dense recent window and the new token are
merged afterwards in torch with the same log-sum-exp rule. Reference: ``bitmap.sparse_attention``
(``tests/test_kv.py`` compares them on a GPU).

Layout read (``bitmap.BitmapRows``): bitmap uint8 [B, Hkv, T, D/8] contiguous, offsets int32
[B, Hkv, T], values [nnz] fp16/bf16/fp32 in row-major order. D must be a power of two (16 … 256).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmcomp.prune.kv.attention import repeat_kv
from llmcomp.prune.kv.bitmap import BitmapRows

NEG = -1.0e30


@triton.jit
def _sparse_rows_decode(q_ptr, kb_ptr, ko_ptr, kv_ptr, vb_ptr, vo_ptr, vv_ptr, mask_ptr, acc_ptr, m_ptr, l_ptr,
                        T, H, HKV, G, scaling,
                        HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    b = pid // H
    h = pid % H
    hk = h // G
    d = tl.arange(0, D)
    q = tl.load(q_ptr + pid * D + d).to(tl.float32)
    byte_col = (d // 8)[None, :]
    bit_col = (d % 8)[None, :]
    m_i = tl.full([1], -1.0e30, tl.float32)  # a literal: jitted code cannot read Python globals
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    row0 = (b * HKV + hk) * T
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < T
        r = (row0 + t).to(tl.int64)
        # keys: bitmap bits → rank among the row's stored entries → gather
        kbyte = tl.load(kb_ptr + r[:, None] * (D // 8) + byte_col, mask=valid[:, None], other=0).to(tl.int32)
        kbit = (kbyte >> bit_col) & 1
        kidx = tl.load(ko_ptr + r, mask=valid, other=0).to(tl.int64)[:, None] + (tl.cumsum(kbit, axis=1) - 1)
        k = tl.load(kv_ptr + kidx, mask=(kbit != 0) & valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scaling
        ok = valid
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + pid.to(tl.int64) * T + t, mask=valid, other=0) != 0)
        s = tl.where(ok, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok, tl.exp(s - m_new), 0.0)
        # values: same expansion, weighted sum
        vbyte = tl.load(vb_ptr + r[:, None] * (D // 8) + byte_col, mask=valid[:, None], other=0).to(tl.int32)
        vbit = (vbyte >> bit_col) & 1
        vidx = tl.load(vo_ptr + r, mask=valid, other=0).to(tl.int64)[:, None] + (tl.cumsum(vbit, axis=1) - 1)
        v = tl.load(vv_ptr + vidx, mask=(vbit != 0) & valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(acc_ptr + pid * D + d, acc)
    one = tl.arange(0, 1)
    tl.store(m_ptr + pid + one, m_i)
    tl.store(l_ptr + pid + one, l_i)


def sparse_decode_attention(q: torch.Tensor, k: BitmapRows, v: BitmapRows, k_dense: torch.Tensor,
                            v_dense: torch.Tensor, sparse_mask: torch.Tensor | None, dense_mask: torch.Tensor | None,
                            scaling: float, block_t: int = 64) -> torch.Tensor:
    """Decode attention over compressed rows + dense tokens. q [B, H, 1, D]; k, v [B, Hkv, T, D]
    compressed; k_dense, v_dense [B, Hkv, W, D]; masks bool broadcastable to [B, H, 1, T] / [B, H, 1, W]
    (None = all allowed). Returns [B, H, 1, D] in q's dtype."""
    b, h, nq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    if nq != 1 or d & (d - 1) or not 16 <= d <= 256:
        raise ValueError(f"the Triton Mustafar kernel needs one query token and a power-of-two head dim, got {q.shape}")
    acc = torch.empty(b * h, d, device=q.device, dtype=torch.float32)
    m = torch.empty(b * h, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    mask = None if sparse_mask is None else sparse_mask.expand(b, h, 1, t).reshape(b * h, t).to(torch.int8).contiguous()
    _sparse_rows_decode[(b * h,)](
        q.contiguous(), k.bitmap.contiguous(), k.offsets.contiguous(), k.values, v.bitmap.contiguous(),
        v.offsets.contiguous(), v.values, mask if mask is not None else acc, acc, m, lsum,
        t, h, hkv, h // hkv, float(scaling), HAS_MASK=mask is not None, D=d, BLOCK_T=block_t)
    n_rep = h // hkv
    s = torch.matmul(q.float(), repeat_kv(k_dense, n_rep).float().transpose(2, 3)) * scaling  # [B, H, 1, W]
    if dense_mask is not None:
        s = s.masked_fill(~dense_mask, NEG)
    m = m.view(b, h, 1, 1)
    top = torch.maximum(m, s.amax(-1, keepdim=True))
    p = torch.exp(s - top)
    if dense_mask is not None:
        p = p * dense_mask
    scale = torch.exp(m - top)
    num = acc.view(b, h, 1, d) * scale + torch.matmul(p, repeat_kv(v_dense, n_rep).float())
    den = lsum.view(b, h, 1, 1) * scale + p.sum(-1, keepdim=True)
    return (num / den).to(q.dtype)
