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


# -- wide codes (more than 8 bits, up to any width) ------------------------------------------------
# Same canonical layout as ``pack_bits`` (code i occupies bits [k*i, k*i + k) of a little-endian stream,
# the code count zero-padded to a multiple of 8), so for k ≤ 8 both functions write identical bytes.
# A code wider than 62 bits is given as int64 limbs [..., n, L] with value Σ limb_l · 2**(62·l).
LIMB_BITS = 62


def n_limbs(bits: int) -> int:
    return (bits + LIMB_BITS - 1) // LIMB_BITS


def tight_len(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` padded to a whole byte only (``pack_wide(..., tight=True)``)."""
    return (n * bits + 7) // 8


def pack_wide(codes: torch.Tensor, bits: int, tight: bool = False) -> torch.Tensor:
    """int64 codes [..., n] (bits ≤ 62) or limbs [..., n, L] → uint8 [..., packed_len(n, bits)].

    ``tight``: pad the stream to a whole byte instead of to 8 codes → [..., tight_len(n, bits)] (the
    same bytes minus the trailing padding; for short rows of wide codes, e.g. 9 PVQ indices of 123 bits,
    the canonical padding would nearly double the row)."""
    if bits < 1:
        raise ValueError(f"bits must be ≥ 1, got {bits}")
    limbs = codes.to(torch.int64)
    if bits <= LIMB_BITS:
        limbs = limbs.unsqueeze(-1)
    *lead, n, L = limbs.shape
    if L * LIMB_BITS < bits:
        raise ValueError(f"{L} limbs hold fewer than {bits} bits")
    shifts = torch.arange(LIMB_BITS, device=limbs.device, dtype=torch.int64)
    planes = ((limbs.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n, L * LIMB_BITS)[..., :bits]
    nbytes = tight_len(n, bits) if tight else packed_len(n, bits)
    stream = planes.reshape(*lead, n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits)).reshape(*lead, nbytes, 8)
    weights = torch.arange(8, device=limbs.device, dtype=torch.int64)  # bit b of byte B = stream bit 8B + b
    return (stream << weights).sum(-1).to(torch.uint8)


def unpack_wide(packed: torch.Tensor, bits: int, n: int, tight: bool = False) -> torch.Tensor:
    """Inverse of ``pack_wide``: int64 [..., n] when bits ≤ 62, else limbs [..., n, n_limbs(bits)]."""
    *lead, m = packed.shape
    if m != (tight_len(n, bits) if tight else packed_len(n, bits)):
        raise ValueError(f"packed length {m} does not match n={n}, bits={bits}")
    weights = torch.arange(8, device=packed.device, dtype=torch.int64)
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> weights) & 1).reshape(*lead, m * 8)
    planes = stream[..., :n * bits].reshape(*lead, n, bits)
    L = n_limbs(bits)
    planes = torch.nn.functional.pad(planes, (0, L * LIMB_BITS - bits)).reshape(*lead, n, L, LIMB_BITS)
    shifts = torch.arange(LIMB_BITS, device=packed.device, dtype=torch.int64)
    limbs = (planes << shifts).sum(-1)  # (..., n, L)
    return limbs.squeeze(-1) if bits <= LIMB_BITS else limbs
