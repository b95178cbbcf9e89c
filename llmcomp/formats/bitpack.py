"""Bit-exact packing of k-bit unsigned codes (k = 1..8) into bytes.

Canonical layout: along the last dimension, every 8 codes become k bytes of a little-endian bit
stream (code i occupies bits [k*i, k*i + k)). For k = 4 that is two codes a byte, low nibble first;
for k = 8 it is the codes themselves. The last dimension is zero-padded to a multiple of 8.
This is the only pack/unpack pair for integer codes: tests and kernels call it, never re-derive it.
"""
from __future__ import annotations

import math

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


_SHIFT_BITS = 56  # codes this wide or narrower are shifted into ≤ 8 bytes each (7 + 56 < 64 bits); wider: bit planes
_BUDGET = 1 << 27  # bytes of temporaries a chunk of rows may use (the bit-plane path needs ~1 KB a code)


def _by_rows(fn, x: torch.Tensor, trailing: int, bytes_per_row: int) -> torch.Tensor:
    """``fn`` over chunks of the rows of ``x`` (its dims before the last ``trailing`` flattened) so that one call's
    temporaries stay near ``_BUDGET``; each chunk's result is written into one preallocated output, which gets
    back the leading shape."""
    lead = x.shape[:x.dim() - trailing]
    rows = x.reshape(math.prod(lead), *x.shape[x.dim() - trailing:])
    step = max(1, _BUDGET // max(1, bytes_per_row))
    if rows.shape[0] <= step:
        out = fn(rows)
    else:
        first = fn(rows[:step])
        out = first.new_empty(rows.shape[0], *first.shape[1:])
        out[:step] = first
        for i in range(step, rows.shape[0], step):
            out[i:i + step] = fn(rows[i:i + step])
    return out.reshape(*lead, *out.shape[1:])


def _stream_bytes(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first byte of code i, its bit offset in that byte) in the little-endian stream."""
    o = torch.arange(n, device=device, dtype=torch.int64) * bits
    return o // 8, o % 8


def _pack_shifted(codes: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """codes [R, n] (bits ≤ _SHIFT_BITS) → uint8 [R, nbytes]: each code's low ``bits`` bits (as the bit-plane
    path keeps them) shifted to its bit offset and split into the ≤ 8 bytes it touches, added into place (codes
    never share a bit, so the sum is their OR)."""
    codes = codes.to(torch.int64) & ((1 << bits) - 1)
    r, n = codes.shape
    span = (bits + 7 + 7) // 8
    first, off = _stream_bytes(n, bits, codes.device)
    at = torch.arange(span, device=codes.device, dtype=torch.int64)
    parts = ((codes << off).unsqueeze(-1) >> (8 * at)) & 0xFF  # [R, n, span]
    out = torch.zeros(r, nbytes + span, device=codes.device, dtype=torch.int64)
    out.scatter_add_(1, (first.unsqueeze(-1) + at).reshape(1, -1).expand(r, -1), parts.reshape(r, n * span))
    return out[:, :nbytes].to(torch.uint8)


def _unpack_shifted(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``_pack_shifted``: uint8 [R, m] → int64 [R, n] (the ≤ 8 bytes of each code gathered)."""
    span = (bits + 7 + 7) // 8
    first, off = _stream_bytes(n, bits, packed.device)
    at = torch.arange(span, device=packed.device, dtype=torch.int64)
    b = torch.nn.functional.pad(packed.to(torch.int64) & 0xFF, (0, span))[:, first.unsqueeze(-1) + at]  # [R, n, span]
    word = (b << (8 * at)).sum(-1)  # byte 7 may wrap into the sign bit: the mask below drops it
    return (word >> off) & ((1 << bits) - 1)


def _pack_planes(limbs: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """limbs int64 [R, n, L] → uint8 [R, nbytes] through one int64 a bit (codes wider than _SHIFT_BITS)."""
    limbs = limbs.to(torch.int64)
    r, n, L = limbs.shape
    shifts = torch.arange(LIMB_BITS, device=limbs.device, dtype=torch.int64)
    planes = ((limbs.unsqueeze(-1) >> shifts) & 1).reshape(r, n, L * LIMB_BITS)[..., :bits]
    stream = torch.nn.functional.pad(planes.reshape(r, n * bits), (0, nbytes * 8 - n * bits)).reshape(r, nbytes, 8)
    weights = torch.arange(8, device=limbs.device, dtype=torch.int64)  # bit b of byte B = stream bit 8B + b
    return (stream << weights).sum(-1).to(torch.uint8)


def _unpack_planes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``_pack_planes``: uint8 [R, m] → limbs int64 [R, n, n_limbs(bits)]."""
    r, m = packed.shape
    weights = torch.arange(8, device=packed.device, dtype=torch.int64)
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> weights) & 1).reshape(r, m * 8)
    planes = stream[:, :n * bits].reshape(r, n, bits)
    L = n_limbs(bits)
    planes = torch.nn.functional.pad(planes, (0, L * LIMB_BITS - bits)).reshape(r, n, L, LIMB_BITS)
    shifts = torch.arange(LIMB_BITS, device=packed.device, dtype=torch.int64)
    return (planes << shifts).sum(-1)


def pack_wide(codes: torch.Tensor, bits: int, tight: bool = False) -> torch.Tensor:
    """int64 codes [..., n] (bits ≤ 62) or limbs [..., n, L] → uint8 [..., packed_len(n, bits)].

    ``tight``: pad the stream to a whole byte instead of to 8 codes → [..., tight_len(n, bits)] (the
    same bytes minus the trailing padding; for short rows of wide codes, e.g. 9 PVQ indices of 123 bits,
    the canonical padding would nearly double the row). Rows are packed in chunks, so the temporaries stay
    bounded whatever the tensor's size."""
    if bits < 1:
        raise ValueError(f"bits must be ≥ 1, got {bits}")
    limbs = codes.unsqueeze(-1) if bits <= LIMB_BITS else codes  # int64 per chunk, not here (one copy less)
    n, L = limbs.shape[-2:]
    if L * LIMB_BITS < bits:
        raise ValueError(f"{L} limbs hold fewer than {bits} bits")
    nbytes = tight_len(n, bits) if tight else packed_len(n, bits)
    if bits <= _SHIFT_BITS:
        return _by_rows(lambda c: _pack_shifted(c[..., 0], bits, nbytes), limbs, 2, n * 8 * 24 + nbytes * 8)
    return _by_rows(lambda c: _pack_planes(c, bits, nbytes), limbs, 2, n * L * LIMB_BITS * 8 * 3)


def unpack_wide(packed: torch.Tensor, bits: int, n: int, tight: bool = False) -> torch.Tensor:
    """Inverse of ``pack_wide``: int64 [..., n] when bits ≤ 62, else limbs [..., n, n_limbs(bits)]."""
    m = packed.shape[-1]
    if m != (tight_len(n, bits) if tight else packed_len(n, bits)):
        raise ValueError(f"packed length {m} does not match n={n}, bits={bits}")
    if bits <= _SHIFT_BITS:
        return _by_rows(lambda p: _unpack_shifted(p, bits, n), packed, 1, n * 8 * 24 + m * 8)
    limbs = _by_rows(lambda p: _unpack_planes(p, bits, n), packed, 1, n * n_limbs(bits) * LIMB_BITS * 8 * 3)
    return limbs.squeeze(-1) if bits <= LIMB_BITS else limbs
