"""Bit-exact packing of k-bit unsigned codes (k = 1..8) into bytes.

Canonical layout: along the last dimension, every 8 codes become k bytes of a little-endian bit
stream (code i occupies bits [k*i, k*i + k)). For k = 4 that is two codes a byte, low nibble first;
for k = 8 it is the codes themselves. The last dimension is zero-padded to a multiple of 8.
This is the only pack/unpack pair for integer codes: tests and kernels call it, never re-derive it.
"""
from __future__ import annotations

import torch


def packed_len(n: int, bits: int) -> int:
    return (n + 7) // 8 * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8/int [..., n] with values in [0, 2**bits) → uint8 [..., packed_len(n, bits)]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, n = codes.shape
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)  # (..., n/8, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1, keepdim=True)  # (..., n/8, 1): 8*bits ≤ 64 bits
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF  # (..., n/8, bits)
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [..., packed_len(n, bits)] → uint8 [..., n]."""
    *lead, m = packed.shape
    if m != packed_len(n, bits):
        raise ValueError(f"packed length {m} does not match n={n}, bits={bits}")
    b = packed.to(torch.int64).reshape(*lead, -1, bits)
    byte_shifts = torch.arange(bits, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # (..., n/8, 1)
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)  # (..., n/8, 8)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)
