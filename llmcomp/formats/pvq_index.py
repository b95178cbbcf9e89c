"""Exact enumeration of the pyramid P(N, K) = {y ∈ ℤᴺ : Σ|yᵢ| = K} (Fischer's PVQ index).

``V(n, k)``, the number of points, obeys V(n, k) = V(n−1, k) + V(n, k−1) + V(n−1, k−1), V(n, 0) = 1,
V(0, k>0) = 0. Points are ordered by their first coordinate, in the order 0, +1, −1, +2, −2, …, then
recursively by the rest, so the index of y is a sum over positions of how many points come before
this coordinate's value. With P(m, x) = Σ_{u≤x} V(m, u), the points of an m-dimensional tail with r
pulses that start with magnitude j ≥ 1 are preceded by

    T(m, r, j) = V(m−1, r) + 2·Σ_{t=1}^{j−1} V(m−1, r−t) = V(m, r) − 2·P(m−1, r−j)

points, plus V(m−1, r−j) more when the sign is negative. Encoding adds these terms; decoding finds,
position by position, the largest j with T(m, r, j) ≤ index by a binary search on the monotone
2·P(m−1, ·). An index needs ⌈log₂ V(N, K)⌉ bits, more than 64 for large N and K, so indices are held
as little-endian int64 limbs of 62 bits (``bitpack.LIMB_BITS``) and every step is vectorized over all
groups (a Python loop runs over the N positions and the few limbs only).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from llmcomp.formats.bitpack import LIMB_BITS, n_limbs

MASK = (1 << LIMB_BITS) - 1


@lru_cache(maxsize=None)
def _counts(n: int, k: int) -> tuple[tuple[int, ...], ...]:
    """V(m, r) for m ≤ n, r ≤ k as Python ints."""
    V = [[0] * (k + 1) for _ in range(n + 1)]
    for m in range(n + 1):
        V[m][0] = 1
    for m in range(1, n + 1):
        for r in range(1, k + 1):
            V[m][r] = V[m - 1][r] + V[m][r - 1] + V[m - 1][r - 1]
    return tuple(tuple(row) for row in V)


@lru_cache(maxsize=64)
def pyramid_sizes(n: int, kmax: int) -> tuple[int, ...]:
    """V(n, k) for k = 0..kmax (one O(n·kmax) pass)."""
    row = [1] + [0] * kmax  # m = 0
    for _ in range(n):
        new = [1] * (kmax + 1)
        for r in range(1, kmax + 1):
            new[r] = row[r] + new[r - 1] + row[r - 1]
        row = new
    return tuple(row)


def pyramid_size(n: int, k: int) -> int:
    """V(n, k): the number of points of the pyramid (a Python int, exact at any size)."""
    return _counts(n, k)[n][k]


def index_bits(n: int, k: int) -> int:
    """⌈log₂ V(n, k)⌉: bits of one index."""
    return (pyramid_size(n, k) - 1).bit_length()


def limbs_of(n: int, k: int) -> int:
    return n_limbs(max(1, pyramid_size(n, k).bit_length()))


def from_int(values, L: int) -> torch.Tensor:
    """Python ints → int64 limbs [len(values), L]."""
    return torch.tensor([[(v >> (LIMB_BITS * i)) & MASK for i in range(L)] for v in values], dtype=torch.int64)


def to_int(limbs: torch.Tensor) -> list[int]:
    """int64 limbs [G, L] → Python ints (tests, debugging)."""
    return [sum(int(x) << (LIMB_BITS * i) for i, x in enumerate(row)) for row in limbs.tolist()]


@lru_cache(maxsize=16)
def _tables_cpu(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V [n+1, k+1, L] and 2·P [n+1, k+1, L] as limbs (only entries ≤ V(n, k) are ever used)."""
    V = _counts(n, k)
    L = limbs_of(n, k)
    cap = pyramid_size(n, k)
    P2 = []
    for m in range(n + 1):
        acc, row = 0, []
        for x in range(k + 1):
            acc += V[m][x]
            row.append(min(2 * acc, cap))  # 2P(m, x) ≤ V(n, k) wherever it is read (x < r ≤ k, m < n)
        P2.append(row)
    flat = lambda rows: from_int([v for row in rows for v in row], L).reshape(n + 1, k + 1, L)  # noqa: E731
    return flat(V), flat(P2)


def _tables(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    V, P2 = _tables_cpu(n, k)
    return V.to(device), P2.to(device)


# -- vectorized big integers: int64 [G, L], little-endian limbs of LIMB_BITS bits --------------------
def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s = a + b
    out = torch.empty_like(s)
    carry = torch.zeros_like(s[:, 0])
    for i in range(s.shape[1]):
        t = s[:, i] + carry
        out[:, i] = t & MASK
        carry = t >> LIMB_BITS
    return out


def _sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a − b for a ≥ b."""
    d = a - b
    out = torch.empty_like(d)
    borrow = torch.zeros_like(d[:, 0])
    for i in range(d.shape[1]):
        t = d[:, i] - borrow
        borrow = (t < 0).to(t.dtype)
        out[:, i] = t + (borrow << LIMB_BITS)
    return out


def _lt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a < b (bool [G]); higher limbs decide."""
    res = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    for i in range(a.shape[1]):
        res = torch.where(a[:, i] != b[:, i], a[:, i] < b[:, i], res)
    return res


def encode(y: torch.Tensor, k: int) -> torch.Tensor:
    """Pyramid points y (int [G, n], Σ|y| = k per row) → indices as int64 limbs [G, L]."""
    G, n = y.shape
    V, P2 = _tables(n, k, y.device)
    y = y.to(torch.int64)
    if bool(((y.abs().sum(1)) != k).any()):
        raise ValueError(f"every vector must have Σ|y| = {k}")
    idx = torch.zeros(G, V.shape[-1], dtype=torch.int64, device=y.device)
    r = torch.full((G,), k, dtype=torch.int64, device=y.device)
    zero = torch.zeros_like(idx)
    for i in range(n):
        m = n - i
        j = y[:, i].abs()
        rest = (r - j).clamp(min=0)
        term = _sub(V[m, r], P2[m - 1, rest])  # T(m, r, j) for j ≥ 1
        term = _add(term, torch.where((y[:, i] < 0)[:, None], V[m - 1, rest], zero))
        idx = _add(idx, torch.where((j > 0)[:, None], term, zero))
        r = r - j
    return idx


def _log2(limbs: torch.Tensor) -> torch.Tensor:
    """int64 limbs [..., L] (non-negative) → float64 log₂ of the value (−1 for 0) [...]: monotone, and finite at any
    width (a value itself passes float64's range above ~2¹⁰²⁴, 17 limbs, which indices of up to ~1130 bits reach).
    From the top two non-zero limbs: ~42 bits of the value at 1130 bits, far finer than the relative gap (≥ 1/(K+1))
    between the table entries the search compares it with."""
    nz = limbs != 0
    pos = torch.arange(limbs.shape[-1], device=limbs.device)
    t = torch.where(nz, pos, torch.zeros_like(pos)).amax(-1, keepdim=True)  # the top non-zero limb (0 if none)
    d = limbs.double()
    top = d.gather(-1, t).squeeze(-1)
    below = torch.where(t > 0, d.gather(-1, (t - 1).clamp(min=0)), torch.zeros_like(top.unsqueeze(-1))).squeeze(-1)
    val = top * 2.0 ** LIMB_BITS + below
    out = torch.log2(val) + LIMB_BITS * (t.squeeze(-1).double() - 1)
    return torch.where(nz.any(-1), out, torch.full_like(out, -1.0))


def decode(limbs: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``encode``: int64 limbs [G, L'] (any L' ≥ the significant limbs) → int16 y [G, n]."""
    V, P2 = _tables(n, k, limbs.device)
    L = V.shape[-1]
    G = limbs.shape[0]
    b = limbs.to(torch.int64)
    b = b[:, :L] if b.shape[1] >= L else torch.nn.functional.pad(b, (0, L - b.shape[1]))
    r = torch.full((G,), k, dtype=torch.int64, device=b.device)
    y = torch.zeros(G, n, dtype=torch.int16, device=b.device)
    P2f = _log2(P2)  # [n+1, k+1] float64 log₂: guides the search, exact compares settle it
    for i in range(n):
        m = n - i
        zero = _lt(b, V[m - 1, r])  # fewer than V(m−1, r) points start with 0
        c = _sub(V[m, r], b)  # > 0
        # smallest x in [0, r−1] with 2·P(m−1, x) ≥ c (strictly increasing in x for m ≥ 2); j = r − x.
        # The float log₂ keeps ~42 bits or more, so the float search is off by at most one where c is within
        # rounding of a table entry: two exact comparisons correct it.
        x = torch.searchsorted(P2f[m - 1], _log2(c).unsqueeze(1)).squeeze(1)
        x = torch.minimum(x, (r - 1).clamp(min=0))
        x = torch.where(_lt(P2[m - 1, x], c), torch.minimum(x + 1, (r - 1).clamp(min=0)), x)
        below = (x - 1).clamp(min=0)
        x = torch.where((x > 0) & ~_lt(P2[m - 1, below], c), below, x)
        j = torch.where(zero, torch.zeros_like(r), r - x)
        nb = _sub(P2[m - 1, x], c)  # index − T(m, r, j)
        rest = (r - j).clamp(min=0)
        neg = (j > 0) & ~_lt(nb, V[m - 1, rest])
        nb = torch.where(neg[:, None], _sub(nb, V[m - 1, rest]), nb)
        b = torch.where((j > 0)[:, None], nb, b)
        y[:, i] = torch.where(neg, -j, j).to(torch.int16)
        r = r - j
    return y
