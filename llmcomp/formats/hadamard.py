"""Seeded random Hadamard rotation of a weight's input dimension (incoherence processing, QuIP-style).

    W_rot = W · R,    R = D · blockdiag(H_b) / √b

``D`` is a diagonal of random signs drawn from ``seed`` (torch's CPU generator, so every machine draws
the same signs); ``H_b`` is the Sylvester Hadamard matrix of the largest power of two ``b`` that
divides ``in_features`` (capped at ``MAX_BLOCK``: 576 → 64, 1536 → 512). ``R`` is orthogonal, so a
layer ``y = x·Wᵀ`` equals ``x·(W·R)·Rᵀ``: a format stores ``W·R`` and its dequantize applies ``Rᵀ``.
Nothing but the seed is stored. The transform is the fast Walsh–Hadamard butterfly, O(n log b).
"""
from __future__ import annotations

import torch

MAX_BLOCK = 512


def block_size(in_features: int) -> int:
    return min(in_features & -in_features, MAX_BLOCK)


def signs(in_features: int, seed: int, device=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    d = torch.randint(0, 2, (in_features,), generator=g).float() * 2 - 1
    return d.to(device)


def fwht(x: torch.Tensor, b: int) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform of each block of ``b`` along the last dim (b a power of 2)."""
    *lead, n = x.shape
    y = x.reshape(-1, n // b, b)
    h = 1
    while h < b:
        y = y.reshape(y.shape[0], n // b, b // (2 * h), 2, h)
        a, c = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2)
        h *= 2
    return y.reshape(*lead, n)


def rotate(w: torch.Tensor, seed: int, d: torch.Tensor | None = None) -> torch.Tensor:
    """``w · R`` for ``w`` [..., in] (float32). ``d``: ``signs(in, seed)`` on w's device, where the caller keeps it
    (no host-to-device copy a call, nothing random inside a compiled graph)."""
    n = w.shape[-1]
    b = block_size(n)
    return fwht(w.float() * (signs(n, seed, w.device) if d is None else d), b) / b**0.5


def unrotate(w: torch.Tensor, seed: int) -> torch.Tensor:
    """``w · Rᵀ``, the inverse of ``rotate`` (H_b is symmetric)."""
    n = w.shape[-1]
    b = block_size(n)
    return fwht(w.float(), b) / b**0.5 * signs(n, seed, w.device)


def rotate_hessian(H: torch.Tensor, seed: int) -> torch.Tensor:
    """``Rᵀ · H · R``: the input statistics of the rotated layer (its inputs are ``x · R``)."""
    return rotate(rotate(H, seed).T, seed)
