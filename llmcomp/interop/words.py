"""Codes ↔ int32 words: the packing that GPTQ and compressed-tensors checkpoints share.

Both store b-bit codes as one little-endian bit stream per row, cut into int32 words (GPTQ's 3-bit
"32 values in 3 words" layout is exactly that stream). llmcomp's ``bitpack`` writes the same stream in
bytes, so a row of words is its bytes viewed as int32 on a little-endian machine.
"""
from __future__ import annotations

import sys

import torch

from llmcomp.formats.bitpack import pack_bits, packed_len, unpack_bits


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("int32 checkpoint packing assumes a little-endian machine")


def codes_to_words(codes: torch.Tensor, bits: int, n_words: int) -> torch.Tensor:
    """codes uint8 [rows, n] in [0, 2**bits) → int32 [rows, n_words] (zero-padded stream)."""
    _require_little_endian()
    stream = pack_bits(codes.to(torch.uint8), bits)  # [rows, packed_len(n, bits)] bytes
    need = 4 * n_words
    if stream.shape[1] > need:  # bitpack pads to 8 codes; the tail bytes must then be zero
        if stream[:, need:].any():
            raise ValueError(f"{codes.shape[1]} {bits}-bit codes do not fit in {n_words} int32 words")
        stream = stream[:, :need]
    stream = torch.nn.functional.pad(stream, (0, need - stream.shape[1]))
    return stream.contiguous().view(torch.int32)


def words_to_codes(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``codes_to_words``: int32 [rows, W] → uint8 codes [rows, n]."""
    _require_little_endian()
    if words.shape[1] * 32 < n * bits:
        raise ValueError(f"{words.shape[1]} int32 words cannot hold {n} {bits}-bit codes")
    stream = words.contiguous().view(torch.uint8)  # [rows, 4W]
    need = packed_len(n, bits)
    if stream.shape[1] < need:
        stream = torch.nn.functional.pad(stream, (0, need - stream.shape[1]))
    return unpack_bits(stream[:, :need].contiguous(), bits, n)
