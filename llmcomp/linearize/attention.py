"""Causal linear attention with an optional decay gate, and its hybrid with sliding-window softmax.

Core op (GLA-style recurrence; heads already expanded for GQA)::

    q, k   [B, H, T, F]   feature-mapped queries / keys
    v      [B, H, T, D]
    g      None | [B, H, T] (log decay per head and token, ≤ 0) | [B, H, T, F] (per key feature)
    state  [B, H, F, D]
    S_t = diag(exp g_t) · S_{t-1} + k_tᵀ v_t          o_t = q_t · S_t

in three forms that agree to rounding: ``naive_linear_attention`` (quadratic, the reference),
``chunk_linear_attention`` (training / prefill: dense within chunks, the state carried between them)
and ``recurrent_linear_attention`` (decode: one token at a time, constant memory).

``hybrid_attention`` adds the LoLCATs / Liger "hybrid within a layer": query ``i`` attends with
softmax to the last ``window`` keys (``i-W < j ≤ i``) and linearly to everything older
(``j ≤ i-W``). The linear part is the core op on keys shifted by ``W`` positions, with each query
scaled by the decay of the ``W`` gates it skipped; its state is exactly "every token that has left the
window", and a :class:`HybridState` keeps the window's tokens, so decode memory is O(W), independent
of the context length. Two ways to combine the parts:

* ``normalize=True`` (LoLCATs / Hedgehog): one normaliser over both parts,
  ``o = (a·Σ_win e^{s-m} v + b·Σ_lin φqφk v) / (a·Σ_win e^{s-m} + b·Σ_lin φqφk)``;
* ``normalize=False`` (Liger): ``o = a·softmax_window(v) + b·Σ_lin φqφk v`` (unnormalised GLA).

``a`` / ``b`` are per-head weights [H]. The denominator of the linear part rides along as an extra
all-ones value column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


def _gate4(g: Optional[Tensor], q: Tensor) -> Tensor:
    """The gate as [B, H, T, F'] (F' = 1 for a per-head gate, F for a per-feature gate), in q's dtype."""
    if g is None:
        return q.new_zeros(*q.shape[:3], 1)
    return (g if g.dim() == 4 else g[..., None]).to(q.dtype)


def naive_linear_attention(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                           initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Quadratic reference: ``o_i = Σ_{j≤i} Σ_f q_if k_jf exp(G_if - G_jf) v_j`` (+ the initial state's
    share), G the cumulative log decay. Returns (o [B, H, T, D], final state [B, H, F, D])."""
    T = q.shape[2]
    G = _gate4(g, q).cumsum(2)  # [B, H, T, F']
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = (G[:, :, :, None] - G[:, :, None]).masked_fill(~allowed[..., None], float("-inf"))  # [B, H, i, j, F']
    scores = (q[:, :, :, None] * k[:, :, None] * diff.exp()).sum(-1)  # [B, H, i, j]
    o = scores @ v
    last = G[:, :, -1:]  # [B, H, 1, F']
    state = (k * (last - G).exp()).transpose(-1, -2) @ v
    if initial_state is not None:
        o = o + (q * G.exp()) @ initial_state
        state = state + last[:, :, 0, :, None].exp() * initial_state
    return o, state


def recurrent_linear_attention(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                               initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence (decode). Same contract as ``naive_linear_attention``."""
    B, H, T, F = q.shape
    S = initial_state if initial_state is not None else q.new_zeros(B, H, F, v.shape[-1])
    a = _gate4(g, q).exp()[..., None]  # [B, H, T, F', 1]
    outs = []
    for t in range(T):
        S = a[:, :, t] * S + k[:, :, t, :, None] * v[:, :, t, None, :]  # [B, H, F, D]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, 2), S


def chunk_linear_attention(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                           initial_state: Optional[Tensor] = None, chunk_size: int = 64
                           ) -> tuple[Tensor, Tensor]:
    """Chunked form: exact pairwise decays inside each chunk (stable: every exponent ≤ 0), the state
    carried across chunks. Per-feature gates build a [.., C, C, F] decay tensor: use a small chunk (16)."""
    B, H, T, F = q.shape
    D = v.shape[-1]
    C = max(1, min(chunk_size, T))
    gg = _gate4(g, q)
    pad = (-T) % C
    if pad:  # zero keys and zero gates change nothing
        q, k, v, gg = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v, gg))
    N = (T + pad) // C
    q, k, gg = q.view(B, H, N, C, F), k.view(B, H, N, C, F), gg.view(B, H, N, C, -1)
    v = v.reshape(B, H, N, C, D)
    b = gg.cumsum(3)  # within-chunk cumulative log decay [B, H, N, C, F']
    allowed = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (b[..., :, None, :] - b[..., None, :, :]).masked_fill(~allowed[..., None], float("-inf"))
    if gg.shape[-1] == 1:
        scores = (q @ k.transpose(-1, -2)) * diff[..., 0].exp()  # [B, H, N, C, C]
    else:
        scores = torch.einsum("bhnif,bhnjf,bhnijf->bhnij", q, k, diff.exp())
    o = scores @ v
    last = b[..., -1:, :]  # [B, H, N, 1, F']
    contrib = (k * (last - b).exp()).transpose(-1, -2) @ v  # what each chunk adds to the state [B, H, N, F, D]
    q_dec = q * b.exp()
    carry = last[..., 0, :, None].exp()  # [B, H, N, F', 1]
    S = initial_state if initial_state is not None else q.new_zeros(B, H, F, D)
    inter = []
    for n in range(N):
        inter.append(q_dec[:, :, n] @ S)
        S = carry[:, :, n] * S + contrib[:, :, n]
    o = (o + torch.stack(inter, 2)).reshape(B, H, N * C, D)[:, :, :T]
    return o, S


# -- hybrid: sliding-window softmax + linear attention ---------------------------------------------

@dataclass
class HybridState:
    """One layer's decode state: the linear state of every token that left the window, and the
    window's last ``W`` tokens (left-padded with zeros until ``seen ≥ W``). Memory O(W), not O(seen)."""

    S: Tensor  # [B, H, F, D'] (D' = D + 1 when normalised: the denominator column)
    k: Tensor  # [B, H, W, Dk] softmax keys (after RoPE)
    v: Tensor  # [B, H, W, D'] values (+ ones column)
    fk: Tensor  # [B, H, W, F] feature-mapped keys
    g: Optional[Tensor]  # [B, H, W, F'] log gates, or None
    seen: int

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.S, self.k, self.v, self.fk, self.g) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_select(self, index: Tensor) -> "HybridState":
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return HybridState(pick(self.S), pick(self.k), pick(self.v), pick(self.fk), pick(self.g), self.seen)


def empty_state(q: Tensor, fq: Tensor, v: Tensor, g: Optional[Tensor], window: int, normalize: bool
                ) -> HybridState:
    B, H = q.shape[:2]
    D = v.shape[-1] + int(normalize)
    zeros = lambda *s: v.new_zeros(B, H, *s)  # noqa: E731
    gate = None if g is None else zeros(window, g.shape[-1] if g.dim() == 4 else 1)
    return HybridState(zeros(fq.shape[-1], D), zeros(window, q.shape[-1]), zeros(window, D),
                       zeros(window, fq.shape[-1]), gate, 0)


def _window_softmax(q: Tensor, k_all: Tensor, v_all: Tensor, window: int, seen: int, scale: float
                    ) -> tuple[Tensor, Tensor]:
    """Softmax numerator and denominator of each new query over its window, in blocks of ``Q = min(W, n)``
    queries (each block reads the W + Q keys its queries see): O(n·W), not O(n²) — and a decode step (n = 1)
    scores one query against W + 1 keys, not a block of W against 2W. ``k_all``/``v_all`` = [W buffered | n new]
    tokens. Returns (Σ e^{s-m} v [B, H, n, D'], Σ e^{s-m} [B, H, n, 1])."""
    B, H, n, Dk = q.shape
    W, Q = window, min(window, n)
    M = -(-n // Q)
    pad = M * Q - n
    L = W + Q  # keys a block reads: from its first query's window start to its last query
    qb = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(B, H, M, Q, Dk)
    kp = torch.nn.functional.pad(k_all, (0, 0, 0, pad + Q))  # [B, H, W + (M+1)Q, Dk]
    vp = torch.nn.functional.pad(v_all, (0, 0, 0, pad + Q))
    kb = kp.unfold(2, L, Q)[:, :, :M].transpose(-1, -2)  # [B, H, M, L, Dk]
    vb = vp.unfold(2, L, Q)[:, :, :M].transpose(-1, -2)
    i = torch.arange(Q, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None]
    start = torch.arange(M, device=q.device)[:, None, None] * Q
    c = start + j  # key index in [buffer | new]
    allowed = (j > i) & (j <= W + i) & (c >= W - min(seen, W)) & (c < W + n)  # [M, Q, L]
    allowed = allowed | ((start + i >= n) & (j == W + i))  # padding queries see one zero key: no NaN in backward
    s = (qb @ kb.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    e = (s - s.amax(-1, keepdim=True)).exp()
    num = (e @ vb).reshape(B, H, M * Q, -1)[:, :, :n]
    den = e.sum(-1, keepdim=True).reshape(B, H, M * Q, 1)[:, :, :n]
    return num, den


def hybrid_attention(q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, v: Tensor, g: Optional[Tensor] = None,
                     *, window: int = 0, scale: float = 1.0, window_weight: Optional[Tensor] = None,
                     linear_weight: Optional[Tensor] = None, normalize: bool = True,
                     state: Optional[HybridState] = None, recurrent: bool = False, chunk_size: int = 64,
                     eps: float = 1e-12) -> tuple[Tensor, HybridState]:
    """Attention of ``n`` new tokens given the ``state`` of the tokens before them (None = none).

    ``q``, ``k`` [B, H, n, Dk]: softmax queries / keys (window part); ``fq``, ``fk`` [B, H, n, F]:
    their feature maps (linear part); ``v`` [B, H, n, D]; ``g`` log gates as in the core op;
    ``window_weight`` / ``linear_weight`` [H] (default 1). ``recurrent`` picks the token-by-token core
    (decode) instead of the chunked one; on a GPU the core runs on a fast path (``kernels.core_for``).
    Returns (o [B, H, n, D], the state after these tokens)."""
    B, H, n, _ = v.shape
    W = window
    if state is None:
        state = empty_state(k, fq, v, g, W, normalize)
    vx = torch.cat([v, v.new_ones(B, H, n, 1)], -1) if normalize else v
    gx = None if g is None else (g if g.dim() == 4 else g[..., None])
    fk_all = torch.cat([state.fk, fk], 2)
    v_all = torch.cat([state.v, vx], 2)
    g_all = None if gx is None else torch.cat([state.g, gx], 2)
    # Linear part: keys shifted by W (query i reads keys ≤ i-W); the query carries the W skipped gates.
    fq_lin = fq
    if g_all is not None and W:
        cum = g_all.to(torch.promote_types(g_all.dtype, torch.float32)).cumsum(2)
        fq_lin = fq * (cum[:, :, W:] - cum[:, :, :n]).exp().to(fq.dtype)
    from llmcomp.linearize.kernels import core_for  # (imports this module)

    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (fq, fk, v, g, state.S))
    _, core = core_for(fq, recurrent, chunk_size, needs_grad)
    # the core takes per-head gates as [B, H, n] (a 4-D gate is one per feature), not the [.., 1] kept here
    g_core = None if g_all is None else g_all[:, :, :n] if g.dim() == 4 else g_all[:, :, :n, 0]
    lin, S = core(fq_lin, fk_all[:, :, :n], v_all[:, :, :n], g_core, initial_state=state.S)
    one = v.new_ones(H)
    a = (one if window_weight is None else window_weight).view(1, H, 1, 1)
    b = (one if linear_weight is None else linear_weight).view(1, H, 1, 1)
    if W:
        k_all = torch.cat([state.k, k], 2)
        num, den = _window_softmax(q, k_all, v_all, W, state.seen, scale)
        if normalize:
            o = (a * num + b * lin) / (a * den + b * lin[..., -1:]).clamp_min(eps)
        else:
            o = a * num / den + b * lin
        new = HybridState(S, k_all[:, :, -W:], v_all[:, :, -W:], fk_all[:, :, -W:],
                          None if g_all is None else g_all[:, :, -W:], state.seen + n)
    else:
        o = lin / lin[..., -1:].clamp_min(eps) if normalize else b * lin
        new = HybridState(S, state.k, state.v, state.fk, state.g, state.seen + n)
    return o[..., :v.shape[-1]], new


def naive_hybrid_attention(q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, v: Tensor, g: Optional[Tensor] = None,
                           *, window: int = 0, scale: float = 1.0, window_weight: Optional[Tensor] = None,
                           linear_weight: Optional[Tensor] = None, normalize: bool = True,
                           eps: float = 1e-12) -> Tensor:
    """Quadratic reference of ``hybrid_attention`` over a whole sequence (for tests)."""
    B, H, T, _ = v.shape
    W = window
    idx = torch.arange(T, device=q.device)
    band = (idx[None] <= idx[:, None]) & (idx[None] > idx[:, None] - W)  # softmax keys of each query
    older = idx[None] <= idx[:, None] - W  # linear keys
    G = _gate4(g, fq).cumsum(2)
    diff = (G[:, :, :, None] - G[:, :, None]).masked_fill(~older[..., None], float("-inf"))
    lin_scores = (fq[:, :, :, None] * fk[:, :, None] * diff.exp()).sum(-1)  # [B, H, i, j]
    one = v.new_ones(H)
    a = (one if window_weight is None else window_weight).view(1, H, 1, 1)
    b = (one if linear_weight is None else linear_weight).view(1, H, 1, 1)
    if W:
        s = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~band, float("-inf"))
        e = (s - s.amax(-1, keepdim=True)).exp()
    if normalize:
        weights = b * lin_scores + (a * e if W else 0)
        return (weights @ v) / weights.sum(-1, keepdim=True).clamp_min(eps)
    out = b * (lin_scores @ v)
    if W:
        out = out + a * (e / e.sum(-1, keepdim=True)) @ v
    return out
