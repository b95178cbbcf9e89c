"""CPU checks of the kernel plumbing: dispatch falls back to the reference, and the CUDA kernel's weight
layout (built by ``prepare`` on any device) holds every code exactly once, where the kernel reads it."""
import pytest
import torch

from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats import Uniform
from llmcomp.kernels import fast_path, reference_linear
from llmcomp.kernels import uniform_cuda
from llmcomp.quant.rtn import rtn_fields


def _unrepack(words: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """Inverse of ``uniform_cuda.repack`` through the same tables (the kernel's reading order)."""
    rows, ks, pos = uniform_cuda._tables(bits, words.device)
    kb = uniform_cuda.kblock(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF  # [NT, KB, 32, 4]
    per_word = rows.numel() // (32 * 4)
    fields = (w.unsqueeze(-1) >> pos.view(32, 4, per_word)) & ((1 << bits) - 1)  # [NT, KB, 32, 4, per_word]
    out = torch.full((n // 16, k // kb, 16, kb), -1, dtype=torch.int64)
    out[:, :, rows, ks] = fields.reshape(n // 16, k // kb, -1)
    return out.permute(0, 2, 1, 3).reshape(n, k)


@pytest.mark.parametrize("bits", [2, 4])
def test_repack_round_trip(bits):
    n, k = 48, 2 * uniform_cuda.kblock(bits)
    codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(bits))
    words = uniform_cuda.repack(codes, bits, rows_per_chunk=32)
    assert words.dtype == torch.int32 and words.shape == (n // 16, k // uniform_cuda.kblock(bits), 32, 4)
    back = _unrepack(words, bits, n, k)
    assert (back >= 0).all(), "some code position is never read by the kernel"
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_layout_tables_are_a_permutation(bits):
    rows, ks, pos = uniform_cuda._tables(bits, torch.device("cpu"))
    cells = rows * 1000 + ks
    assert cells.unique().numel() == 16 * uniform_cuda.kblock(bits) == cells.numel()
    # within one lane-word the bit fields never overlap
    per_word = pos.view(32, 4, -1)
    assert all(len(set(ws.tolist())) == ws.numel() for ws in per_word.view(-1, per_word.shape[-1]))


def test_shape_rules():
    f4 = Uniform(bits=4, group_size=128)
    assert uniform_cuda.shape_ok(f4, 4096, 4096) and uniform_cuda.shape_ok(f4, 576 * 2, 192)
    assert not uniform_cuda.shape_ok(f4, 4096, 4100)          # rows not a multiple of 16
    assert not uniform_cuda.shape_ok(f4, 4096 + 32, 4096)     # inputs not a multiple of 64
    assert not uniform_cuda.shape_ok(f4, 4096 + 64, 4096)     # ragged last group
    assert not uniform_cuda.shape_ok(Uniform(bits=3, group_size=128), 4096, 4096)
    assert uniform_cuda.shape_ok(Uniform(bits=2, group_size=32), 256, 32)
    assert not uniform_cuda.shape_ok(Uniform(bits=2, group_size=32), 576, 32)  # 576 % 128


def test_cpu_dispatch_uses_the_reference():
    fmt = Uniform(bits=4, group_size=32)
    w = torch.randn(32, 64)
    t = fmt.pack(rtn_fields(w, fmt))
    x = torch.randn(3, 64)
    assert fast_path(fmt, x, t, 64) is None
    q = QuantLinear.from_packed(fmt, t, 64)
    with torch.no_grad():
        assert torch.equal(q(x), reference_linear(x, fmt, t, 64))
