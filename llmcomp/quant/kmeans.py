"""Weighted k-means on whatever device the data is on (codebooks of ``vptq``, gain levels of ``pvq``).

Each coordinate of each point has its own weight (VPTQ weights a weight by its input's Hessian
diagonal, so the codebook spends its entries where the output error is made):

    d(x, c) = Σᵢ hᵢ (xᵢ − cᵢ)² = Σ h x² − 2 (h⊙x)·c + h·c²

so distances to all entries are two matmuls, and the centroid of a cluster is Σ h⊙x / Σ h per
coordinate (``cluster_sums``: summed in a fixed order on every device). Initialization is k-means++ (weighted D² sampling); past ``sample`` points
the fit runs on a seeded sample that keeps every heavy point (``_stratified_sample``). The only Python
loops run over entries (k-means++) and iterations, never over points.
"""
from __future__ import annotations

import torch

CHUNK = 1 << 15  # points per distance block: CHUNK × entries floats at a time


def assign(x: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor) -> torch.Tensor:
    """Nearest entry of ``c`` [E, d] for each point of ``x`` [n, d] under weights ``h`` [n, d]
    (None: Euclidean). Returns int64 [n]."""
    # one matmul per block: [h, h⊙x] @ [c²; −2c]ᵀ (Euclidean: [1, x] @ [Σc²; −2c]ᵀ)
    if h is None:
        rhs = torch.cat([(c * c).sum(1, keepdim=True).T, -2 * c.T])  # (1 + d, E)
    else:
        rhs = torch.cat([(c * c).T, -2 * c.T])  # (2d, E)
    out = []
    for s in range(0, x.shape[0], CHUNK):
        xs = x[s:s + CHUNK]
        if h is None:
            lhs = torch.cat([torch.ones_like(xs[:, :1]), xs], 1)
        else:
            hs = h[s:s + CHUNK]
            lhs = torch.cat([hs, hs * xs], 1)
        out.append((lhs @ rhs).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


def _plus_plus(x: torch.Tensor, h: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen, device=x.device))
    centers = [x[first]]
    best = ((x - x[first]) ** 2 * h).sum(1)
    for _ in range(1, k):
        total = best.sum()
        if not bool(total > 0):  # fewer distinct points than entries: repeat points
            i = int(torch.randint(n, (1,), generator=gen, device=x.device))
        else:
            i = int(torch.multinomial(best / total, 1, generator=gen))
        centers.append(x[i])
        best = torch.minimum(best, ((x - x[i]) ** 2 * h).sum(1))
    return torch.stack(centers)


def _stratified_sample(x: torch.Tensor, h: torch.Tensor, sample: int, gen: torch.Generator):
    """``sample`` points standing in for all of ``x`` in the weighted objective: the heavy points (Σh
    above 1/``sample`` of the total, i.e. those weight-proportional sampling would always take; at most
    half the sample) exactly, plus a uniform draw from the rest whose weights are scaled by the inverse
    draw rate (an unbiased estimate of the rest's share). A plain uniform draw missed or under-drew the
    few heavy points of a layer with outlier inputs (down_proj: a handful of inputs carry most of H's
    trace), and the codebook, fitted to whatever the seed drew, varied 20-25 % in output error by seed
    (issue 6); layers without heavy points get the plain uniform draw."""
    w = h.sum(1)
    n_top = min(int((w > w.sum() / sample).sum()), sample // 2)
    order = torch.argsort(w, descending=True, stable=True)
    top, rest = order[:n_top], order[n_top:]
    n_draw = sample - n_top
    drawn = rest[torch.randperm(rest.numel(), generator=gen, device=x.device)[:n_draw]]
    scale = rest.numel() / n_draw
    return torch.cat([x[top], x[drawn]]), torch.cat([h[top], h[drawn] * scale])


def cluster_sums(idx: torch.Tensor, values: torch.Tensor, k: int, chunked: bool | None = None) -> torch.Tensor:
    """Σ ``values`` [n, d] per cluster ``idx`` [n] → [k, d], the same bits on every run. On the CPU
    ``index_add_`` adds in order; on CUDA it adds with atomics in no fixed order (torch documents it as
    nondeterministic), so there (``chunked``, default: ``values.is_cuda``) the sums are one-hot matmuls in
    float64 over fixed chunks of points, added chunk by chunk."""
    if not (values.is_cuda if chunked is None else chunked):
        return torch.zeros(k, values.shape[1], dtype=values.dtype, device=values.device).index_add_(0, idx, values)
    out = torch.zeros(k, values.shape[1], dtype=torch.float64, device=values.device)
    entries = torch.arange(k, device=values.device)
    step = max(1, (1 << 22) // k)  # a one-hot block of at most 4 M float64 (32 MB)
    for s in range(0, idx.shape[0], step):
        onehot = (idx[s:s + step, None] == entries).to(torch.float64)
        out += onehot.T @ values[s:s + step].double()
    return out.to(values.dtype)


@torch.no_grad()
def kmeans(x: torch.Tensor, h: torch.Tensor | None, k: int, iters: int = 15, sample: int = 1 << 16,
           seed: int = 0) -> torch.Tensor:
    """``k`` weighted centroids [k, d] of the points ``x`` [n, d] (weights ``h`` [n, d] ≥ 0, None: 1).

    The fit uses at most ``sample`` points (``_stratified_sample``); assign all points afterwards.
    """
    x = x.float()
    h = torch.ones_like(x) if h is None else h.float().expand_as(x)
    n = x.shape[0]
    if k > n:
        raise ValueError(f"{k} centroids for {n} points")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if n > max(sample, k):  # never fewer sample points than entries
        x, h = _stratified_sample(x, h, max(sample, k), gen)
    h = h + 1e-12 * h.mean().clamp(min=1e-30)  # a point never has zero total weight
    c = _plus_plus(x, h, k, gen)
    for _ in range(iters):
        idx = assign(x, h, c)
        num, den = cluster_sums(idx, torch.cat([h * x, h], 1), k).split(c.shape[1], 1)
        new = torch.where(den > 0, num / den.clamp(min=1e-30), c)
        empty = den.sum(1) == 0
        if bool(empty.any()):  # re-seed empty entries at the worst-served points
            err = ((x - new[idx]) ** 2 * h).sum(1)
            new[empty] = x[torch.topk(err, int(empty.sum())).indices]
        if torch.equal(new, c):
            break
        c = new
    return c
