"""Triton fused recurrent linear attention, forward (see ``kernels.py``).

One program per (sequence·head, block of ``BD`` value columns) keeps its [F, BD] slice of the state in
registers and walks the tokens: ``S = diag(exp g_t) S + k_tᵀ v_t``, ``o_t = q_t S``. Every token's
inputs are read once and the state never leaves the chip until the end, so a decode step is one launch
and a prefill reads q, k, v, g once (the torch recurrent form does ~5 launches a token)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


@triton.jit
def _recurrent_fwd(q, k, v, g, s0, o, sT, T, F, D,
                   BF: tl.constexpr, BD: tl.constexpr, GATE: tl.constexpr, HAS_S0: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_f = tl.arange(0, BF)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mf, md = offs_f < F, offs_d < D
    m2 = mf[:, None] & md[None, :]
    s_off = bh * F * D + offs_f[:, None] * D + offs_d[None, :]
    if HAS_S0:
        S = tl.load(s0 + s_off, mask=m2, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BF, BD], dtype=tl.float32)
    for t in tl.range(0, T):
        row = bh * T + t
        qt = tl.load(q + row * F + offs_f, mask=mf, other=0.0).to(tl.float32)
        kt = tl.load(k + row * F + offs_f, mask=mf, other=0.0).to(tl.float32)
        vt = tl.load(v + row * D + offs_d, mask=md, other=0.0).to(tl.float32)
        if GATE == 1:
            S = S * tl.exp(tl.load(g + row).to(tl.float32))
        if GATE == 2:
            gt = tl.load(g + row * F + offs_f, mask=mf, other=0.0).to(tl.float32)
            S = S * tl.exp(gt)[:, None]
        S = S + kt[:, None] * vt[None, :]
        ot = tl.sum(qt[:, None] * S, axis=0)
        tl.store(o + row * D + offs_d, ot.to(o.dtype.element_ty), mask=md)
    tl.store(sT + s_off, S, mask=m2)


def recurrent_fwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                  initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    B, H, T, F = q.shape
    D = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gate = 0 if g is None else (1 if g.dim() == 3 else 2)
    if g is not None and tuple(g.shape) != ((B, H, T) if gate == 1 else (B, H, T, F)):
        raise ValueError(f"gate of shape {tuple(g.shape)} for q of shape {tuple(q.shape)}")  # else: reads past it
    g_ = q if g is None else g.contiguous()  # a dummy pointer when there is no gate
    s0 = initial_state.contiguous() if initial_state is not None else q
    o = torch.empty(B, H, T, D, device=q.device, dtype=v.dtype)
    sT = torch.empty(B, H, F, D, device=q.device, dtype=torch.float32)
    BF = triton.next_power_of_2(F)
    BD = min(32, triton.next_power_of_2(D))
    grid = (B * H, triton.cdiv(D, BD))
    _recurrent_fwd[grid](q, k, v, g_, s0, o, sT, T, F, D, BF=BF, BD=BD, GATE=gate,
                         HAS_S0=initial_state is not None, num_warps=4)
    if initial_state is not None and initial_state.dtype != sT.dtype:
        sT = sT.to(initial_state.dtype)
    return o, sT
