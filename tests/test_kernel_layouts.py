"""CPU checks of the kernel plumbing: dispatch falls back to the reference, and the CUDA kernel's weight
layout (built by ``prepare`` on any device) holds every code exactly once, where the kernel reads it."""
import importlib.util
import re
from pathlib import Path

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


def _prepared_codes(prep: dict) -> torch.Tensor:
    """The codes [n, kp] a prepared 2- or 4-bit layout holds (E2M1: its nibbles' bits moved back first)."""
    words = uniform_cuda.e2m1_bits(prep["qw"], to_kernel=False) if prep["elem"] == 1 else prep["qw"]
    return _unrepack(words, prep["bits"], prep["n"], prep["kp"])


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
    # a ragged last group is the kernel's group k // G like the others (576 inputs in groups of 128: the bundled
    # model's q/k/v/o/gate/up at the default group size); E2M1 blocks must divide K (test below)
    assert uniform_cuda.shape_ok(f4, 4096 + 32, 4096) and uniform_cuda.shape_ok(f4, 576, 1536)
    assert uniform_cuda.shape_ok(Uniform(bits=3, group_size=128), 576, 192)
    assert uniform_cuda.shape_ok(Uniform(bits=3, group_size=128), 4096, 4096)
    # inputs not whole kblocks are padded to them (prepare / gemm): 4096 + 64 for the 3-bit kblock of 128
    assert uniform_cuda.shape_ok(Uniform(bits=3, group_size=64), 4096 + 64, 4096)
    assert uniform_cuda.shape_ok(Uniform(bits=4, group_size=32), 4096 + 32, 4096)
    assert not uniform_cuda.shape_ok(Uniform(bits=8, group_size=128), 4096, 4096)
    assert uniform_cuda.shape_ok(Uniform(bits=2, group_size=32), 256, 32)
    assert uniform_cuda.shape_ok(Uniform(bits=2, group_size=32), 576, 32)  # 576 = 4.5 kblocks: padded to 640
    assert not uniform_cuda.shape_ok(Uniform(bits=2, group_size=16), 576, 32)  # a lane's 32 inputs span groups
    # the kernel's multiply-high group index needs K · group < 2^32 (one group a row always fits)
    assert not uniform_cuda.shape_ok(Uniform(bits=4, group_size=1 << 16), 1 << 17, 16)
    assert uniform_cuda.shape_ok(Uniform(bits=4, group_size=1 << 15), 1 << 16, 16)
    assert uniform_cuda.shape_ok(Uniform(bits=4, group_size=0), 1 << 17, 16)


def test_cpu_dispatch_uses_the_reference():
    fmt = Uniform(bits=4, group_size=32)
    w = torch.randn(32, 64)
    t = fmt.pack(rtn_fields(w, fmt))
    x = torch.randn(3, 64)
    assert fast_path(fmt, x, t, 64) is None
    q = QuantLinear.from_packed(fmt, t, 64)
    with torch.no_grad():
        assert torch.equal(q(x), reference_linear(x, fmt, t, 64))


def _as_float(half: torch.Tensor, dtype) -> torch.Tensor:
    """16-bit patterns (int64 in [0, 2^16)) read as ``dtype`` values (float64)."""
    return (half - ((half >> 15) << 16)).to(torch.int16).view(dtype).double()


def _words(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << 32, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_e2m1_bit_move_reads_as_value_times_2_to_minus_b(dtype):
    """uniform_mma.cuh's ``decode_e2m1`` transcribed step for step onto integers (a check of the bit trick,
    not of the compiled kernel — the CUDA tests do that): on random full words of nibbles (pair e at bits 4e and
    16 + 4e) moved by ``e2m1_bits``, pair e becomes two 16-bit floats equal to e2m1(code) · 2^-B, untouched by the
    other codes; and the move is undone exactly."""
    from llmcomp.formats.minifloat import E2M1

    mag_at = 9 if dtype == torch.float16 else 6
    values = E2M1.values("cpu").double() * 2.0 ** -uniform_cuda.E2M1_BIAS[dtype]
    nib = _words(4096, 1)
    signed = (nib - ((nib >> 31) << 32)).to(torch.int32)
    moved = uniform_cuda.e2m1_bits(signed)
    assert torch.equal(uniform_cuda.e2m1_bits(moved, to_kernel=False), signed)
    w = moved.to(torch.int64) & 0xFFFFFFFF
    shifts = set()
    for e in range(4):
        sign = (w << (3 - e)) & 0xFFFFFFFF
        mag = ((w << (mag_at - 3 * e)) if 3 * e <= mag_at else (w >> (3 * e - mag_at))) & (0x00070007 << mag_at)
        shifts |= {3 - e, mag_at - 3 * e}
        word = (sign & 0x80008000) | mag
        for hi in (0, 16):
            code = (nib >> (4 * e + hi)) & 15
            got = _as_float((word >> hi) & 0xFFFF, dtype)
            assert torch.equal(got, values[code]), (e, hi)
    assert len(shifts - {0}) == 5  # the point of the move: 5 shifts a word (nibbles in place took 7)


def test_e2m1_formats_take_the_mma_kernel_shapes():
    from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
    from llmcomp.formats.minifloat import Minifloat

    assert uniform_cuda.shape_ok(MXFP4(), 4096, 4096) and uniform_cuda.shape_ok(NVFP4(), 576, 192)
    assert uniform_cuda.shape_ok(FP4(group_size=128), 1024, 64) and uniform_cuda.shape_ok(FP4(group_size=0), 576, 64)
    assert not uniform_cuda.shape_ok(FP4(group_size=128), 576, 64)               # ragged last group
    assert not uniform_cuda.shape_ok(FP4(group_size=32, element=Minifloat(1, 2)), 1024, 64)  # not E2M1
    assert uniform_cuda.shape_ok(MXFP4(), 4096 + 32, 4096)                       # padded to whole kblocks of 64
    assert not uniform_cuda.shape_ok(NVFP4(block_size=8), 4096, 4096)            # block below a lane's 16 inputs


def test_e2m1_prepare_scales(monkeypatch):
    """prepare keeps the codes in the uniform layout (their bits moved by ``e2m1_bits``) and the block multiplier
    in float32; the kernel's 16-bit scale (byte scales off) is S · 2^B in the activation dtype, and a scale that
    overflows it sends the weight to the reference path."""
    from llmcomp.formats.fp4 import FP4, NVFP4
    from llmcomp.quant.fp4 import fp4_fields

    monkeypatch.setenv("LLMCOMP_E2M1_BYTE_SCALES", "0")
    fmt = NVFP4()
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    t = fmt.pack(fp4_fields(w, fmt))
    prep = uniform_cuda.prepare(fmt, t, 128)
    f = fmt.unpack(t, 128)
    assert torch.equal(_prepared_codes(prep), f["codes"].long())
    assert torch.equal(prep["scale"], fmt.block_scale(f))
    for dtype, b in uniform_cuda.E2M1_BIAS.items():
        sz = uniform_cuda.scale_pairs(prep, dtype)
        assert sz.dtype == torch.int16 and sz.shape == (32, 128 // 16)
        back = sz.view(dtype).double() * 2.0 ** -b  # S · 2^B in dtype, scaled back: S within half an ulp
        assert bool(((back - prep["scale"].double()).abs() <= prep["scale"].double() * torch.finfo(dtype).eps).all())
        assert uniform_cuda.scales_fit(prep, dtype)
    big = FP4(group_size=64)
    tb = big.pack(fp4_fields(w * 1000, big))  # block scales ~ 30: 30 · 2^14 overflows fp16
    pb = uniform_cuda.prepare(big, tb, 128)
    assert not uniform_cuda.scales_fit(pb, torch.float16) and uniform_cuda.scales_fit(pb, torch.bfloat16) is False


def _kernel_byte_imad(dtype: torch.dtype) -> tuple[int, int]:
    """(multiplier, addend) of one 16-bit half of the kernel's byte-scale IMAD, read from the C++ source
    (uniform_mma.cuh: Num<T>::E2M1_MUL, E2M1_ADD = (E0 << shift) * 0x10001)."""
    src = (Path(uniform_cuda.__file__).parent / "csrc" / "uniform_mma.cuh").read_text()
    name = "__half" if dtype == torch.float16 else "__nv_bfloat16"
    body = src[src.index(f"struct Num<{name}> {{"):]
    hit = re.search(r"E2M1_MUL = 0x([0-9a-fA-F]+)u, E2M1_ADD = \((\d+)u << (\d+)\) \* 0x10001u;", body)
    mul, e0, shift = int(hit.group(1), 16), int(hit.group(2)), int(hit.group(3))
    assert mul >> 16 == mul & 0xFFFF, "the multiplier is the same in both halves"
    return mul & 0xFFFF, e0 << shift


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_e2m1_byte_constants_match_the_kernel(dtype):
    """The byte scales' base exponent E0 lives in Python (``E2M1_BYTE``, which prepare uses) and in the kernel's
    IMAD constants (C++): the two agree, and the IMAD puts the byte's 5 + 3 bits under the exponent and mantissa."""
    mul, add = _kernel_byte_imad(dtype)
    e0 = uniform_cuda.E2M1_BYTE[dtype][0]
    mant = 7 if dtype == torch.bfloat16 else 10  # mantissa bits of the 16-bit float
    assert add == e0 << mant and mul == 1 << (mant - 3)


def _byte_scale_value(sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the kernel makes of byte scales (uniform_mma.cuh: one IMAD into a 16-bit float with the kernel's own
    constants, times the decode's 2^-B, the row's fp32 factor at the end), in float64 [N, G']."""
    mul, add = _kernel_byte_imad(dtype)
    n = sz.shape[0]
    factor = sz[:, :4].contiguous().view(torch.float32).reshape(n).double()
    bits = sz[:, 4:].to(torch.int64) * mul + add
    return bits.to(torch.int16).view(dtype).double() * 2.0 ** -uniform_cuda.E2M1_BIAS[dtype] * factor[:, None]


def test_e2m1_byte_scales(monkeypatch):
    """MXFP4 and NVFP4 block scales as the kernel's bytes (elem 9) in both dtypes: read back as the kernel reads
    them, every block's scale is the stored multiplier × the tensor scale exactly; all-zero blocks (MXFP4 gives them
    2^-127, NVFP4 0) get multiplier 0 and codes 0 and do not widen a row's span; scales too large for the 16-bit form
    stay on the kernel; fp16-scaled ``fp4``, a row spanning more exponents than the dtype allows and
    LLMCOMP_E2M1_BYTE_SCALES=0 keep the 16-bit scales (elem 1)."""
    from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
    from llmcomp.quant.fp4 import fp4_fields

    g = torch.Generator().manual_seed(5)
    for fmt in (MXFP4(), NVFP4()):
        w = torch.randn(32, 256, generator=g) * 0.05
        w[3, :32] = 0
        w[5] *= 1000  # S · 2^14 overflows fp16: the 16-bit form sent such weights to the reference path
        t = fmt.pack(fp4_fields(w, fmt))
        prep = uniform_cuda.prepare(fmt, t, 256)
        f = fmt.unpack(t, 256)
        mult, factor = fmt.scale_parts(f)
        assert torch.equal(prep["scale"], fmt.block_scale(f))
        empty = prep["mult"] == 0
        assert bool(empty[3, :32 // fmt.block_size].all()) and int(empty.sum()) == 32 // fmt.block_size
        assert int(_prepared_codes(prep)[3, :32].abs().sum()) == 0
        assert torch.equal(_prepared_codes(prep)[~empty.repeat_interleave(fmt.block_size, 1)],
                           f["codes"].long()[~empty.repeat_interleave(fmt.block_size, 1)])
        for dtype in (torch.float16, torch.bfloat16):
            sz = uniform_cuda.scale_pairs(prep, dtype)
            assert sz.dtype == torch.uint8 and sz.shape == (32, 4 + 256 // fmt.block_size)
            assert uniform_cuda.kernel_elem(prep, dtype) == 9 and uniform_cuda.scales_fit(prep, dtype)
            got = _byte_scale_value(sz, dtype)[~empty]
            assert torch.equal(got, (mult.double() * factor.double())[~empty]), (fmt.name, dtype)
    fp4 = FP4(group_size=32)
    prep = uniform_cuda.prepare(fp4, fp4.pack(fp4_fields(torch.randn(32, 256, generator=g), fp4)), 256)
    assert uniform_cuda.scale_pairs(prep, torch.bfloat16).dtype == torch.int16
    assert uniform_cuda.kernel_elem(prep, torch.bfloat16) == 1
    mx = MXFP4()
    w = torch.randn(32, 256, generator=g)
    w[0, :32] *= 2.0 ** -25  # row 0 spans ~26 exponents: within bf16's 31, beyond fp16's 19
    prep = uniform_cuda.prepare(mx, mx.pack(fp4_fields(w, mx)), 256)
    assert uniform_cuda.kernel_elem(prep, torch.bfloat16) == 9 and uniform_cuda.kernel_elem(prep, torch.float16) == 1
    monkeypatch.setenv("LLMCOMP_E2M1_BYTE_SCALES", "0")
    prep = uniform_cuda.prepare(mx, mx.pack(fp4_fields(torch.randn(32, 256, generator=g), mx)), 256)
    assert uniform_cuda.kernel_elem(prep, torch.bfloat16) == 1


def test_repack3_round_trip():
    """3-bit codes: the low plane reads back through the 2-bit tables, the high plane through its own, and
    together they give every code once."""
    n, k = 32, 256
    codes = torch.randint(0, 8, (n, k), generator=torch.Generator().manual_seed(3))
    lo, hi = uniform_cuda.repack3(codes, rows_per_chunk=16)
    assert lo.shape == (n // 16, k // 128, 32, 4) and hi.shape == (n // 16, k // 128, 32, 2)
    low = _unrepack(lo, 2, n, k)
    rows, ks, pos = uniform_cuda._high_tables(torch.device("cpu"))
    w = hi.to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> pos.view(32, 2, 32)) & 1
    high = torch.full((n // 16, k // 128, 16, 128), -1, dtype=torch.int64)
    high[:, :, rows, ks] = bits.reshape(n // 16, k // 128, -1)
    high = high.permute(0, 2, 1, 3).reshape(n, k)
    assert (high >= 0).all() and torch.equal(low + 4 * high, codes)


def _field_2bit(w: torch.Tensor, e: int, dtype) -> tuple[int, torch.Tensor]:
    """uniform_mma.cuh's ``field_at`` / ``field_word`` for 2-bit pairs: (p, the word pair e is read from at bit p) —
    fp16 at p = 2 (e % 4) of w or w >> 8, bf16 at p = 2 (e % 3) after a shift by 6 (e // 3) (``bf16_at``,
    ``bf16_shift``)."""
    if dtype == torch.float16:
        return 2 * (e % 4), w >> (8 * (e // 4))
    return 2 * (e % 3), w >> (6 * (e // 3))


def _centered(hv: torch.Tensor, p: int, z: torch.Tensor, magic_f: float, dtype) -> torch.Tensor:
    """``decode_centered``: code − z from a field read as MAGIC + 2^p code — h·2^-p + (MAGIC − MAGIC·2^-p − (MAGIC + z))
    with the constant rounded to ``dtype`` as the kernel's sub2 rounds it, or h − (MAGIC + z) in bf16 at p = 0."""
    if p == 0 and dtype == torch.bfloat16:
        return hv - (magic_f + z)
    return hv * 2.0 ** -p + ((magic_f - magic_f * 2.0 ** -p) - (magic_f + z)).to(dtype).double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_3bit_decode_reads_the_code(dtype):
    """uniform_mma.cuh's ``decode_word<T, 2, HIGH>`` / ``high_magic`` transcribed step for step onto integers (the
    bit trick, not the compiled kernel): on random full words — the low word holds 16 two-bit fields, the high word
    all 32 bits, of which word j of a pair reads bits 2e + j and 16 + 2e + j — the fma gives each pair's 3-bit code
    exactly, with 3 distinct shifts of the high word a low word in bf16 and 2 in fp16."""
    magic, magic_f = (0x64006400, 1024.0) if dtype == torch.float16 else (0x43004300, 128.0)
    w, hw = _words(4096, 2), _words(4096, 3)
    for j in (0, 1):
        shifts = set()
        for e in range(8):
            p, v = _field_2bit(w, e, dtype)
            s = p + 2 - (2 * e + j)
            shifts.add(s)
            hb = (((hw << s) if s >= 0 else (hw >> -s)) & (0x00010001 << (p + 2))) | magic
            h = (v & (0x00030003 << p)) | hb
            for hi in (0, 16):
                code = ((w >> (2 * e + hi)) & 3) + 4 * ((hw >> (2 * e + j + hi)) & 1)
                hv = _as_float((h >> hi) & 0xFFFF, dtype)
                got = hv * 2.0 ** -p - magic_f * 2.0 ** -p
                assert torch.equal(got, code.double()), (j, e, hi)
                # decode_centered<T, 2, HIGH> (the post-scale kind 8): code − z for zeros 0..7, each step exact
                z = torch.randint(0, 8, w.shape, generator=torch.Generator().manual_seed(e + 8 * j)).double()
                assert torch.equal(_centered(hv, p, z, magic_f, dtype), code.double() - z), (j, e, hi)
        assert len(shifts) == (2 if dtype == torch.float16 else 3)


def test_2bit_bf16_decode_reads_the_code():
    """``decode_word<bf16, 2>`` and ``decode_centered<bf16, 2>`` transcribed onto integers: pair e's field read at bit
    p = 2 (e % 3) of the word shifted by 6 (e // 3) (one shift for three pairs), then h·2^-p − MAGIC·2^-p gives the
    code, and h·2^-p − (MAGIC·2^-p + z) (h − (MAGIC + z) at p = 0) gives code − z, every bf16 step exact."""
    magic, magic_f = 0x43004300, 128.0
    w = _words(4096, 5)
    z = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(6)).double()
    for e in range(8):
        p, v = _field_2bit(w, e, torch.bfloat16)
        h = (v & (0x00030003 << p)) | magic
        for hi in (0, 16):
            code = ((w >> (2 * e + hi)) & 3).double()
            hv = _as_float((h >> hi) & 0xFFFF, torch.bfloat16)
            assert torch.equal(hv * 2.0 ** -p - magic_f * 2.0 ** -p, code), (e, hi)
            const = (magic_f - magic_f * 2.0 ** -p) - (magic_f + z)  # the kernel's sub2, exact in bf16
            assert torch.equal(const.to(torch.bfloat16).double(), const)
            assert torch.equal(_centered(hv, p, z, magic_f, torch.bfloat16), code - z), (e, hi)


def test_post_scale_pairs():
    """The fp32 post-scale kernel's scales: (scale, MAGIC + zero) per row and group in the activation dtype, only
    for codes with integral zeros and groups of whole kblocks; other weights keep (scale, -zero·scale)."""
    fmt = Uniform(bits=4, group_size=128)
    w = torch.randn(32, 256)
    prep = uniform_cuda.prepare(fmt, fmt.pack(rtn_fields(w, fmt)), 256)
    assert prep["zero"] is not None
    for dtype, magic in ((torch.float16, 1024.0), (torch.bfloat16, 128.0)):
        halves = uniform_cuda.scale_pairs(prep, dtype, post=True).view(dtype).reshape(32, 2, 2)
        assert torch.equal(halves[..., 0], prep["scale"].to(dtype))
        assert torch.equal(halves[..., 1].float() - magic, prep["zero"])
        assert not torch.equal(uniform_cuda.scale_pairs(prep, dtype), uniform_cuda.scale_pairs(prep, dtype, post=True))
    f32 = Uniform(bits=4, group_size=32)  # 32 inputs < one 64-input kblock: not whole kblocks
    assert uniform_cuda.prepare(f32, f32.pack(rtn_fields(w, f32)), 256)["zero"] is None
    f3 = Uniform(bits=3, group_size=128)  # 3-bit codes: their kblocks are the 2-bit layout's 128 inputs
    assert uniform_cuda.prepare(f3, f3.pack(rtn_fields(w, f3)), 256)["zero"] is not None
    f3 = Uniform(bits=3, group_size=64)
    assert uniform_cuda.prepare(f3, f3.pack(rtn_fields(w, f3)), 256)["zero"] is None
    t = fmt.pack(rtn_fields(w, fmt))
    t["weight_zero"] = t["weight_zero"] + 0.25  # a real-valued zero (decoupleQ)
    assert uniform_cuda.prepare(fmt, t, 256)["zero"] is None


def test_launch_config_takes_the_h100_sweep_picks(monkeypatch):
    """On an H100 (its name in the device properties) three picks differ from the H200's rule, where one H100 sweep
    timed them faster (bench/results/sweep_{w4_m4,w3,w2}_h100_s53.json, rule_*_h100_s53.json); every other pick is
    the H200's."""
    class Props:
        multi_processor_count = 132
        name = "NVIDIA H200"

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: Props())
    points = [(n, k, b, m, fp16) for n, k in [(4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336),
                                              (28672, 4096), (28672, 8192)]
              for b in (2, 3, 4) for m in (1, 2, 4, 8, 16, 64) for fp16 in (False, True)]
    h200 = {p: uniform_cuda.launch_config(*p[:4], fp16=p[4]) for p in points}
    Props.name = "NVIDIA H100 80GB HBM3"
    h100 = {p: uniform_cuda.launch_config(*p[:4], fp16=p[4]) for p in points}
    changed = {p: (h200[p], h100[p]) for p in points if h200[p] != h100[p]}
    assert changed == {
        **{(14336, 4096, 4, m, fp16): ((1, 4, 1), (2, 4, 1)) for m in (2, 4, 8) for fp16 in (False, True)},
        **{(28672, 8192, 3, 1, fp16): ((1, 4, 1), (2, 4, 1)) for fp16 in (False, True)},
        **{(28672, 8192, 2, m, False): ((2, 8, 1), (2, 4, 1)) for m in (1, 2, 4)},  # (fp16: 4 warps on both)
    }
    assert uniform_cuda.launch_config(28672, 8192, 2, 8) == (2, 2, 1)  # from M = 7 2 warps, as on the H200
    assert uniform_cuda.launch_config(14336, 4096, 4, 4, elem=1) == (1, 4, 1)  # uniform codes only


def test_launch_config_follows_the_h200_sweeps(monkeypatch):
    """launch_config on an H200-sized GPU (132 SMs) returns the configurations the sweeps measured fastest
    (bench/results/kernels_sweep_h200_wide.json, kernels_sweep_h200_rowgroups.json, kernels_sweep_h200_xstage_m64.json,
    kernels_sweep_h200_r2.log, kernels_sweep_h200_r2_m64.log, kernels_sweep_h200_r2_followup_*.json),
    and stays launchable
    (the kernel's blocks hold at most 16 warps at M <= 16, 8 above)."""
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: Props())
    picks = {(n, k, m): uniform_cuda.launch_config(n, k, 4, m)
             for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)] for m in (1, 16, 32, 64)}
    assert picks[(4096, 14336, 1)] == (1, 16, 1) and picks[(4096, 14336, 16)] == (2, 16, 1)
    assert picks[(14336, 4096, 1)] == (1, 4, 1) and picks[(28672, 8192, 1)] == (2, 4, 1)
    assert picks[(14336, 4096, 16)] == (2, 4, 1)  # uniform 4-bit: the post-scale kernel's two tiles
    # M = 9..16 timed in the decode chain (chain_sweep_h200_m16.json): q/k/v and the stacked gate/up
    assert uniform_cuda.launch_config(6144, 4096, 4, 16) == uniform_cuda.launch_config(6144, 4096, 4, 12) == (2, 8, 1)
    assert uniform_cuda.launch_config(28672, 4096, 4, 16) == (2, 2, 2)
    # very many rows with a long K too: one wave of blocks (onewave_w4{,_fp16}_h200_s40.json)
    assert picks[(28672, 8192, 16)] == uniform_cuda.launch_config(28672, 8192, 4, 9) == (2, 2, 2)
    assert uniform_cuda.launch_config(6144, 4096, 4, 8) == (1, 8, 1)
    # E2M1 at M = 9..16 (kernels_sweep_{mxfp4,nvfp4}_m16_h200_s35.json): two tiles, 2 row groups on many rows
    assert uniform_cuda.launch_config(6144, 4096, 4, 16, elem=1) == (2, 8, 1)
    assert uniform_cuda.launch_config(14336, 4096, 4, 12, elem=1) == (2, 4, 2)
    assert uniform_cuda.launch_config(14336, 4096, 4, 8, elem=1) == (1, 4, 1)  # M <= 8: as before
    assert uniform_cuda.launch_config(28672, 4096, 4, 16, elem=1) == (2, 4, 1)  # very many rows: as before
    # ... with byte block scales (elem 9; sweep_{mxfp4,nvfp4}_m16_h200_s42.json): one tile but on a long K with 4096
    # rows or very many
    assert uniform_cuda.launch_config(4096, 4096, 4, 16, elem=9) == uniform_cuda.launch_config(6144, 4096, 4, 9,
                                                                                                 elem=9) == (1, 8, 1)
    assert uniform_cuda.launch_config(4096, 14336, 4, 12, elem=9) == (2, 16, 1)
    assert uniform_cuda.launch_config(14336, 4096, 4, 16, elem=9) == (1, 4, 1)
    assert uniform_cuda.launch_config(28672, 4096, 4, 16, elem=9) == (1, 4, 1)
    assert uniform_cuda.launch_config(28672, 8192, 4, 12, elem=9) == (2, 4, 1)
    assert uniform_cuda.launch_config(14336, 4096, 4, 8, elem=9) == (1, 4, 1)  # M <= 8: the elem-1 rule
    # weights the post-scale kernel cannot serve (groups of 96, LLMCOMP_MMA_POST_SCALE=8): the per-pair kernel, one tile
    assert uniform_cuda.launch_config(6144, 4096, 4, 16, post=False) == (1, 8, 1)
    assert uniform_cuda.launch_config(14336, 4096, 4, 16, post=False)[0] == 1
    # above M = 16, two row tiles a warp where the sweep timed them faster (kernels_sweep_h200_r2_m64.log)
    assert picks[(14336, 4096, 32)] == picks[(14336, 4096, 64)] == (2, 2, 2)
    assert picks[(28672, 8192, 32)] == (1, 1, 8) and picks[(28672, 8192, 64)] == (2, 1, 8)
    # few rows: two tiles at 8 warps at every K above M = 16 (kernels_sweep_h200_r2_followup_w4.json)
    assert picks[(4096, 14336, 64)] == picks[(4096, 14336, 32)] == (2, 8, 1)
    assert picks[(4096, 4096, 32)] == picks[(4096, 4096, 64)] == (2, 8, 1)
    # E2M1 elements (elem 1) too (kernels_sweep_h200_r2_followup_{mxfp4,nvfp4}.json); the 2-bit layout keeps one tile
    assert uniform_cuda.launch_config(14336, 4096, 4, 64, elem=1) == (2, 2, 2)
    assert uniform_cuda.launch_config(4096, 14336, 4, 64, elem=1) == (2, 8, 1)
    assert uniform_cuda.launch_config(28672, 8192, 4, 64, elem=1) == (2, 8, 1)  # very many rows: 8 warps, not staged
    assert uniform_cuda.launch_config(6144, 4096, 4, 32) == (1, 4, 1)  # between 2 and 6 row tiles an SM: 4 warps
    assert uniform_cuda.launch_config(6144, 4096, 2, 32) == (1, 8, 1)  # ... timed for the 4-bit layout only
    assert uniform_cuda.launch_config(14336, 4096, 2, 32)[0] == uniform_cuda.launch_config(4096, 14336, 3, 64)[0] == 1
    from llmcomp.kernels import codebook_cuda  # the codebook kernel does not stage x: never one warp a row group

    assert all(codebook_cuda.launch_config(n, k, m)[0] > 1 for n, k, m in picks)
    # a replicated table (16 copies, 34 KB a block): 16 warps a block at M <= 16, the same split of K
    for n, k, m in picks:
        one, rep = codebook_cuda.launch_config(n, k, m), codebook_cuda.launch_config(n, k, m, 16)
        assert rep[0] == one[0] and rep[0] * rep[1] == (16 if m <= 16 else one[0] * one[1]), (n, k, m)
    assert codebook_cuda.launch_config(14336, 4096, 1, 16) == (4, 4)
    # few kblocks (the bundled model's 576 inputs, padded to 640 = 5 kblocks): the kernel splits K over at most
    # 4 warps, so the block takes 4 row groups to hold 16 warps
    assert codebook_cuda.launch_config(1536, 640, 1, 16) == (4, 4) and codebook_cuda.launch_config(1536, 640, 1)[1] == 1
    assert uniform_cuda.launch_config(28672, 4096, 4, 1) == (2, 4, 1)  # two tiles at M <= 8: 4-bit layouts only
    # 3-bit codes at M <= 8 on few rows: 8 warps, not the 512-thread kernel (kernels_sweep_h200_w3_s31.json), for the
    # per-pair kernel and the post-scale one on a short K
    assert uniform_cuda.launch_config(4096, 14336, 3, 1, post=False) == (1, 8, 1)
    assert uniform_cuda.launch_config(4096, 4096, 3, 8) == (1, 8, 1)
    assert uniform_cuda.launch_config(4096, 14336, 2, 1) == (1, 16, 1)
    # W3 on very many rows with a short K: two tiles at M = 1 too (rule_w3_28672x4096*_h200_s47.json)
    assert uniform_cuda.launch_config(28672, 4096, 3, 1) == uniform_cuda.launch_config(28672, 4096, 3, 1, fp16=True) \
        == (2, 4, 1)
    # 2-bit layouts (sweep_w2_m1_h200_s32.json, sweep_w3_m16_h200_s32.json): W2 on very many rows two tiles x 8 warps
    # at M <= 8; W3 at M = 9..16 two tiles with 4 (many rows) or 8 (very many) row groups, W2 with 2
    # (sweep_w2_m16_h200_s34.json) or 8; few rows as before
    assert uniform_cuda.launch_config(28672, 8192, 2, 1) == uniform_cuda.launch_config(28672, 8192, 2, 4) == (2, 8, 1)
    # ... but 4 warps on a short K or with fp16 activations, where the two-tile kernel is bounded to 7 blocks an SM
    # (rule_w2_28672{,_fp16}_h200_s39.json)
    assert uniform_cuda.launch_config(28672, 4096, 2, 1) == uniform_cuda.launch_config(28672, 4096, 2, 8) == (2, 4, 1)
    assert uniform_cuda.launch_config(28672, 8192, 2, 1, fp16=True) == (2, 4, 1)
    # ... and 2 warps (one wave of 64-thread blocks) in bf16 on a long K from M = 7 (w2_m58_h200_s40.json)
    assert uniform_cuda.launch_config(28672, 8192, 2, 7) == uniform_cuda.launch_config(28672, 8192, 2, 8) == (2, 2, 1)
    assert uniform_cuda.launch_config(28672, 8192, 2, 6) == (2, 8, 1)
    assert uniform_cuda.launch_config(28672, 8192, 2, 8, fp16=True) == (2, 4, 1)
    assert uniform_cuda.launch_config(28672, 8192, 3, 1, fp16=True) == (1, 4, 1)  # W3: the bf16 rule
    assert uniform_cuda.launch_config(14336, 4096, 2, 1) == (1, 4, 1)
    assert uniform_cuda.launch_config(28672, 8192, 3, 1)[0] == 1
    assert uniform_cuda.launch_config(14336, 4096, 3, 16) == (2, 4, 4)
    assert uniform_cuda.launch_config(14336, 4096, 2, 16) == uniform_cuda.launch_config(6144, 4096, 2, 9) == (2, 4, 2)
    assert uniform_cuda.launch_config(4096, 14336, 2, 16) == (2, 16, 1)
    assert uniform_cuda.launch_config(28672, 8192, 3, 16) == uniform_cuda.launch_config(28672, 8192, 2, 12) == (2, 2, 8)
    assert uniform_cuda.launch_config(4096, 14336, 3, 16) == (2, 16, 1)
    # the post-scale kernel at M <= 8 (rule{,2,3}_w{2,3}_h200_s37.json): two tiles from a few tokens on, W3 on few rows
    # with a long K at every M; one tile on 4096 / 6144 rows for W3 with a short K
    lc = uniform_cuda.launch_config
    assert lc(4096, 14336, 3, 1) == lc(4096, 14336, 3, 8) == (2, 16, 1)
    assert lc(4104, 14336, 3, 1) == (1, 8, 1)  # rows not a multiple of 32: one tile at 8 warps
    assert lc(6144, 4096, 3, 8) == lc(6144, 4096, 2, 2) == (1, 8, 1) and lc(6144, 4096, 2, 4) == (2, 8, 1)
    assert lc(14336, 4096, 3, 2) == lc(14336, 4096, 2, 1) == (1, 4, 1)
    assert lc(14336, 4096, 3, 3) == (1, 4, 1)  # rule_m357_w3_h200_s38.json: 13.28 µs against two tiles' 13.69
    assert lc(14336, 4096, 3, 4) == lc(14336, 4096, 3, 8) == (2, 4, 1)
    # W2 on many rows with a short K: two row groups a block from M = 2 (rule_w2_14336x4096*_h200_s47.json); a long K,
    # not timed there, keeps one
    assert lc(14336, 4096, 2, 2) == lc(14336, 4096, 2, 8) == lc(14336, 4096, 2, 4, fp16=True) == (2, 4, 2)
    assert lc(14336, 8192, 2, 4) == (2, 4, 1) and lc(14352, 4096, 2, 4) == (1, 4, 1)
    assert lc(28672, 8192, 3, 1) == (1, 4, 1) and lc(28672, 8192, 3, 2) == lc(28672, 4096, 3, 8) == (2, 4, 1)
    assert lc(4096, 4096, 2, 3) == lc(4096, 14336, 2, 1) == (1, 16, 1)
    assert lc(4096, 4096, 2, 4) == lc(4096, 14336, 2, 2) == lc(4096, 14336, 2, 8) == (2, 16, 1)  # long K: from M = 2
    # (the per-pair kernel — no post-scale pairs — keeps one tile: only the post-scale kernels were timed there)
    assert lc(14336, 4096, 3, 8, post=False) == (1, 4, 1)
    assert lc(4096, 14336, 2, 8, post=False) == (1, 16, 1)
    assert lc(28672, 8192, 3, 8, post=False) == (1, 4, 1)
    assert codebook_cuda.launch_config(28672, 8192, 4) == (4, 1)  # the codebook kernel keeps the old rule (elem 4)
    monkeypatch.setattr(uniform_cuda, "x_stage", lambda: False)  # unstaged, one warp a row group is never picked
    assert uniform_cuda.launch_config(28672, 8192, 4, 64) == (1, 4, 1)
    for (n, k, m), (rt, warps, wr) in picks.items():
        assert rt * 16 * wr <= n and warps * wr <= (16 if m <= 16 else 8), (n, k, m)


def test_launch_override_forces_a_shape_s_configuration(monkeypatch):
    """``LLMCOMP_MMA_LAUNCH`` (a timing knob): its shapes take the given configuration at every M, a two-tile entry
    only where N is a multiple of 32; other shapes keep the rule; malformed entries are skipped with a warning."""
    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: Props())
    rule = uniform_cuda.launch_config(4096, 14336, 4, 1)
    monkeypatch.setenv("LLMCOMP_MMA_LAUNCH", "4096x4096:1.8.1 + 4096X14336:2.4.2+48x64:2.8.1+1x2:3.1.1+bad+9x9:1.16.2")
    uniform_cuda.launch_override.cache_clear()
    try:
        with pytest.warns(UserWarning, match="LLMCOMP_MMA_LAUNCH") as caught:
            forced = uniform_cuda.launch_override()
        assert len(caught) == 3  # rt 3, no shape, 16 warps x 2 row groups
        assert forced == {(4096, 4096): (1, 8, 1), (4096, 14336): (2, 4, 2), (48, 64): (2, 8, 1)}
        assert uniform_cuda.launch_config(4096, 4096, 4, 1) == (1, 8, 1)
        assert uniform_cuda.launch_config(4096, 4096, 2, 64) == (1, 8, 1)
        assert uniform_cuda.launch_config(4096, 14336, 4, 1) == (2, 4, 2) != rule
        assert uniform_cuda.launch_config(48, 64, 4, 1) == (1, 16, 1)  # 48 rows: no two-tile launch, the rule's
        assert uniform_cuda.launch_config(14336, 4096, 4, 1) == (1, 4, 1)  # not listed: the rule's
    finally:
        monkeypatch.delenv("LLMCOMP_MMA_LAUNCH")
        uniform_cuda.launch_override.cache_clear()
    assert uniform_cuda.launch_override() == {} and uniform_cuda.launch_config(4096, 14336, 4, 1) == rule


@pytest.mark.parametrize("value,off", [("0", True), ("OFF", True), ("false", True), ("No", True), (" 0 ", True),
                                       ("1", False), ("", False), ("on", False), ("00", False)])
def test_default_on_switches_read_as_the_extension_reads_them(value, off, monkeypatch):
    """``env_off`` (and so ``x_stage`` and the codebook kernel's switches) turns a default-on switch off for 0 / off /
    false / no in any case, as the extension's ``env_off`` does, and for nothing else."""
    from llmcomp.kernels import codebook_cuda

    for name in ("LLMCOMP_MMA_XSTAGE", "LLMCOMP_VQ_LUT", "LLMCOMP_VQ_REPLICATE"):
        monkeypatch.setenv(name, value)
    cached = (uniform_cuda.x_stage, codebook_cuda._lut_env, codebook_cuda.replicate)
    for f in cached:
        f.cache_clear()
    try:
        assert uniform_cuda.env_off("LLMCOMP_MMA_XSTAGE") is off and uniform_cuda.x_stage() is not off
        assert codebook_cuda._lut_env()[0] is not off and codebook_cuda.replicate() is not off
    finally:
        for f in cached:
            f.cache_clear()


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (2, 0), (4, 32), (4, 128), (3, 128), (2, 128)])
def test_inputs_padded_to_whole_kblocks(bits, group):
    """576 inputs (the bundled model's) with 2/3-bit codes: prepare pads the codes to 640 inputs (code 0) and the
    group scales with zero columns (one group a row stays one), so the kernel's layout holds every real code
    where the kernel reads it and the padded weights are 0 or meet zero x (gemm pads x). Groups of 128 leave a
    ragged last group of 64 inputs: its scales stay in their column, where the kernel's group index k // 128 reads
    them."""
    fmt = Uniform(bits=bits, group_size=group)
    n, k = 32, 576
    t = fmt.pack(rtn_fields(torch.randn(n, k, generator=torch.Generator().manual_seed(bits)), fmt))
    prep = uniform_cuda.prepare(fmt, t, k)
    kp = uniform_cuda.padded_k(k, bits)
    assert prep["kp"] == kp == (576 if bits == 4 else 640)
    codes = fmt.unpack(t, k)["codes"]
    lay = 2 if bits == 3 else bits  # 3-bit: the low 2 bits in the 2-bit layout (the high plane: repack3's test)
    low = _unrepack(prep["qw"], lay, n, kp)
    assert torch.equal(low[:, :k], codes & ((1 << lay) - 1)) and (low[:, k:] == 0).all()
    groups = 1 if group == 0 else -(-kp // group)
    assert prep["scale"].shape == (n, groups) and prep["mz"].shape == (n, groups)
    if group:
        real = -(-k // group)  # (a ragged last group holds real inputs)
        assert torch.equal(prep["scale"][:, :real], fmt.unpack(t, k)["scale"].float())
        assert (prep["scale"][:, real:] == 0).all()  # the groups of padded inputs only
    assert uniform_cuda.shape_ok(fmt, k, n)


@pytest.mark.parametrize("bits", [3, 4])
def test_fuse_stacks_prepared_layouts_without_a_second_copy(bits, monkeypatch):
    """``uniform_cuda.fuse`` (q/k/v, gate/up in one call): the stacked layout is the members' prepared layouts one
    after another along the rows, the call's width their total, each member's own prepared tensors become views of
    the stacked ones; weights the kernel cannot take in one call (another group size) are not stacked."""
    fmt = Uniform(bits=bits, group_size=64)
    k, rows = 256, (32, 16, 48)
    g = torch.Generator().manual_seed(bits)
    tensors = [fmt.pack(rtn_fields(torch.randn(n, k, generator=g), fmt)) for n in rows]
    alone = [uniform_cuda.kernel_tensors(uniform_cuda.prepare(fmt, t, k), torch.bfloat16) for t in tensors]
    caches = [{} for _ in rows]
    run = uniform_cuda.fuse([(fmt, t, k, c) for t, c in zip(tensors, caches)], torch.bfloat16)
    qw, qh, sz, sz_post, b, group, n, elem, kp = run.args
    assert n == sum(rows) and (b, group, kp) == (bits, 64, k)
    monkeypatch.setattr(uniform_cuda, "linear_op", lambda *a: a)  # the call's arguments: x first, then the layout
    x = torch.zeros(1, k)
    assert run(x)[0] is x and run(x)[1:] == run.args
    assert torch.equal(qw, torch.cat([a[0] for a in alone])) and torch.equal(sz, torch.cat([a[2] for a in alone]))
    assert (sz_post is None) == (bits == 3) and (bits != 3 or torch.equal(qh, torch.cat([a[1] for a in alone])))
    if sz_post is not None:
        assert torch.equal(sz_post, torch.cat([a[3] for a in alone]))
    for t, c, a in zip(tensors, caches, alone):
        mine = uniform_cuda.kernel_tensors(uniform_cuda.prepared(fmt, t, k, c), torch.bfloat16)
        assert mine[0].untyped_storage().data_ptr() == qw.untyped_storage().data_ptr() and torch.equal(mine[0], a[0])
        assert mine[2].untyped_storage().data_ptr() == sz.untyped_storage().data_ptr() and torch.equal(mine[2], a[2])
    other = Uniform(bits=bits, group_size=128)
    mixed = [(fmt, tensors[0], k, {}), (other, other.pack(rtn_fields(torch.randn(16, k, generator=g), other)), k, {})]
    assert uniform_cuda.fuse(mixed, torch.bfloat16) is None


def test_post_scale_rows_setting(monkeypatch):
    """How many rows of x the fp32 post-scale kernel serves: 16 by default (and for on / "1"), 8, or 0 (off), from
    LLMCOMP_MMA_POST_SCALE or set_post_scale; anything else is refused."""
    saved = list(uniform_cuda._post_rows)
    try:
        uniform_cuda._post_rows.clear()
        monkeypatch.setenv("LLMCOMP_MMA_POST_SCALE", "8")
        assert uniform_cuda.post_scale() == 8
        uniform_cuda._post_rows.clear()
        monkeypatch.delenv("LLMCOMP_MMA_POST_SCALE")
        assert uniform_cuda.post_scale() == uniform_cuda.POST_SCALE_ROWS == 16
        assert uniform_cuda.set_post_scale(False) == 0 and uniform_cuda.post_scale() == 0
        assert uniform_cuda.set_post_scale(True) == 16 and uniform_cuda.set_post_scale("0") == 0
        assert uniform_cuda.set_post_scale(8) == 8
        with pytest.raises(ValueError, match="0, 8 or 16"):
            uniform_cuda.set_post_scale("12")
        uniform_cuda._post_rows.clear()
        monkeypatch.setenv("LLMCOMP_MMA_POST_SCALE", "on")
        with pytest.raises(ValueError, match="LLMCOMP_MMA_POST_SCALE must be 0, 8 or 16"):
            uniform_cuda.post_scale()
    finally:
        uniform_cuda._post_rows[:] = saved


def test_glu_interleave_pairs_each_gate_row_with_its_up_row_in_a_tile():
    """The GLU layout: each 16-row tile holds 8 gate rows, then the same 8 rows of up (the epilogue pairs row r of a
    tile with r + 8); every packed tensor (codes, scales, zeros) moves with its rows."""
    from llmcomp.kernels.uniform_cuda import glu_interleave

    fmt = Uniform(bits=3, group_size=64)
    gate, up = (fmt.pack(rtn_fields(torch.randn(32, 256, generator=torch.Generator().manual_seed(s)), fmt))
                for s in (0, 1))
    both = glu_interleave(gate, up)
    w = fmt.dequantize(both, 256)
    wg, wu = fmt.dequantize(gate, 256), fmt.dequantize(up, 256)
    assert w.shape == (64, 256)
    for tile in range(4):
        assert torch.equal(w[16 * tile:16 * tile + 8], wg[8 * tile:8 * tile + 8])
        assert torch.equal(w[16 * tile + 8:16 * tile + 16], wu[8 * tile:8 * tile + 8])


def _glu_pair(fmt, n: int, k: int):
    """Gate and up weights [n, k] quantized by the format's own RTN (``rtn_fields`` / ``fp4_fields``), up 7× larger
    than gate (NVFP4: two different tensor scales)."""
    from llmcomp.quant.fp4 import fp4_fields

    g = torch.Generator().manual_seed(n + k)
    ws = (torch.randn(n, k, generator=g) * 0.05, torch.randn(n, k, generator=g) * 0.35)
    fields = fp4_fields if uniform_cuda.is_e2m1(fmt) else rtn_fields
    return tuple(fmt.pack(fields(w, fmt)) for w in ws)


def _prepared_weight(prep: dict, k: int) -> torch.Tensor:
    """The fp32 weight [n, k] a prepared layout (2- or 4-bit codes) holds, read back on the CPU (``_unrepack``):
    E2M1 — e2m1(code) · S, uniform — code · scale + mz; per ``prep["group"]`` inputs (one group a row: all)."""
    from llmcomp.formats.minifloat import E2M1

    codes = _prepared_codes(prep)[:, :k]
    cols = (torch.arange(k) // prep["group"]).clamp(max=prep["scale"].shape[1] - 1)
    if prep["elem"] == 1:
        return E2M1.decode(codes) * prep["scale"][:, cols]
    return codes.float() * prep["scale"][:, cols] + prep["mz"][:, cols]


def _assert_interleaved(both: torch.Tensor, g: torch.Tensor, u: torch.Tensor, what: str):
    """Row 16t + i of ``both`` is g's row 8t + i, row 16t + 8 + i u's, bit for bit."""
    assert both.shape[0] == 2 * g.shape[0] and both.shape[1:] == g.shape[1:], what
    for t in range(g.shape[0] // 8):
        assert torch.equal(both[16 * t:16 * t + 8], g[8 * t:8 * t + 8]), (what, t)
        assert torch.equal(both[16 * t + 8:16 * t + 16], u[8 * t:8 * t + 8]), (what, t)


def _glu_formats():
    from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4

    return [Uniform(bits=4, group_size=128), Uniform(bits=2, group_size=0), MXFP4(), NVFP4(), FP4(group_size=64)]


@pytest.mark.parametrize("fmt", _glu_formats(), ids=lambda f: f.describe())
@pytest.mark.parametrize("k", [256, 576])
def test_prepare_glu_interleaves_each_members_prepared_rows(fmt, k):
    """``prepare_glu``: the GLU call's layout is each member's own ``prepare`` layout, rows interleaved 8 gate + 8 up a
    16-row tile — codes (read back through the kernel's tables), fp32 scales (E2M1: NVFP4's E4M3 block scale × that
    member's tensor scale, different for gate and up), zeros, and the kernel's 16-bit scales in both dtypes, bit for
    bit; the weight the layout holds is each member's reference ``dequantize`` row for row, bit for bit (E2M1)."""
    n = 32
    gate, up = _glu_pair(fmt, n, k)
    if fmt.name == "nvfp4":
        assert not torch.equal(gate["weight_global_scale"], up["weight_global_scale"])
        with pytest.raises(ValueError, match="weight_global_scale"):  # not rows-first: refused, not mixed up
            uniform_cuda.glu_interleave(gate, up)
    prep = uniform_cuda.prepare_glu(fmt, gate, up, k)
    pg, pu = (uniform_cuda.prepare(fmt, t, k) for t in (gate, up))
    assert (prep["n"], prep["kp"], prep["group"], prep["bits"], prep["elem"]) == \
        (2 * n, pg["kp"], pg["group"], pg["bits"], pg["elem"])
    codes = [_prepared_codes(p) for p in (prep, pg, pu)]
    _assert_interleaved(*codes, "codes")
    _assert_interleaved(prep["scale"], pg["scale"], pu["scale"], "scale")
    if prep["elem"] == 0:
        _assert_interleaved(prep["mz"], pg["mz"], pu["mz"], "mz")
        assert (prep["zero"] is None) == (pg["zero"] is None)
        if prep["zero"] is not None:
            _assert_interleaved(prep["zero"], pg["zero"], pu["zero"], "zero")
    for dtype in (torch.float16, torch.bfloat16):
        _assert_interleaved(*(uniform_cuda.scale_pairs(p, dtype) for p in (prep, pg, pu)), f"sz {dtype}")
    if prep["elem"] == 1:  # the layout's weight is the reference's, bit for bit (fp32 scales, exact e2m1 values)
        _assert_interleaved(_prepared_weight(prep, k), fmt.dequantize(gate, k), fmt.dequantize(up, k), "weight")


def test_glu_call_accepts_uniform_and_e2m1_formats_only():
    """``uniform_cuda.glu`` builds its call (a CPU-side check: ``prepare_glu`` and the kernel's tensors) for uniform
    and E2M1 weights; None for other element kinds, rows not a multiple of 8, and shapes the kernel refuses."""
    from llmcomp.formats.fp4 import FP4
    from llmcomp.formats.minifloat import Minifloat

    for fmt in _glu_formats():
        gate, up = _glu_pair(fmt, 24, 256)
        run = uniform_cuda.glu(fmt, gate, up, 256, torch.bfloat16)
        e2m1 = uniform_cuda.is_e2m1(fmt)
        elem = (9 if fmt.name in ("mxfp4", "nvfp4") else 1) if e2m1 else 0  # 9: E2M1 with byte scales
        assert isinstance(run, uniform_cuda.GluCall) and run.args[6] == 48 and run.args[7] == elem, fmt
        assert run.args[3] is None or not e2m1  # E2M1: no post-scale pairs (so no norm split around the call)
        assert uniform_cuda.glu(fmt, *_glu_pair(fmt, 20, 256), 256, torch.bfloat16) is None  # 20 rows: not 8s
    e1m2 = FP4(group_size=64, element=Minifloat(1, 2))
    assert uniform_cuda.glu(e1m2, *_glu_pair(Uniform(bits=4, group_size=64), 16, 256), 256, torch.bfloat16) is None
    ragged = FP4(group_size=128)  # 576 inputs: a ragged last group, which the kernel does not take
    assert uniform_cuda.glu(ragged, *_glu_pair(ragged, 16, 576), 576, torch.bfloat16) is None


@pytest.mark.parametrize("fmt", _glu_formats(), ids=lambda f: f.describe())
def test_glu_call_dense_path_is_silu_gate_times_up(fmt, monkeypatch):
    """``GluCall.dense`` (prefill, more than MAX_M rows) pairs the interleaved weight's columns right: silu(x Wgᵀ) ·
    (x Wuᵀ) from each member's reference ``dequantize``. The CUDA ``dequantize`` of the prepared layout is replaced
    by its CPU read-back (``_prepared_weight``); the CUDA tests run the real one."""
    k = 256
    gate, up = _glu_pair(fmt, 32, k)
    run = uniform_cuda.glu(fmt, gate, up, k, torch.bfloat16)
    monkeypatch.setattr(uniform_cuda, "dequantize", lambda prep, kk, dtype: _prepared_weight(prep, kk).to(dtype))
    x = torch.randn(uniform_cuda.MAX_M + 6, k, generator=torch.Generator().manual_seed(3))
    y = run(x)
    wg, wu = fmt.dequantize(gate, k), fmt.dequantize(up, k)
    ref = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    assert y.shape == (x.shape[0], 32)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("value,want", [("", None), ("  ", None), ("1", True), ("On", True), ("yes", True),
                                        ("0", False), ("off", False), ("2", False)])
def test_tri_state_switches(value, want, monkeypatch):
    """``switches.env_switch``: unset or empty leaves the choice to a rule (None); 1 / true / on / yes force it on,
    anything else off."""
    from llmcomp.kernels.switches import env_switch

    monkeypatch.setenv("LLMCOMP_SOME_SWITCH", value)
    assert env_switch("LLMCOMP_SOME_SWITCH") is want


@pytest.mark.parametrize("bits,group,k,ok", [(4, 128, 256, True), (4, 0, 100, False), (8, 0, 102, False),
                                            (2, 8, 256, False), (2, 24, 240, False), (2, 32, 256, True)])
def test_triton_fallback_takes_only_layers_its_layout_holds(bits, group, k, ok, monkeypatch):
    """The Triton path (after the mma kernel, before the reference) says no to K not in whole 32-bit words and to
    groups whose K-step would hold less than a word — those take the reference instead of failing in prepare."""
    import sys
    from types import ModuleType
    from unittest import mock

    triton = ModuleType("triton")  # a stand-in: supports() and _block_k are plain Python
    triton.jit = triton.autotune = triton.heuristics = lambda *a, **kw: (a[0] if a and callable(a[0]) else (lambda f: f))
    triton.Config = mock.MagicMock()
    triton.language = mock.MagicMock()
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", triton.language)
    # loaded under another name, so that the real module (on a GPU machine) is untouched by the stand-in
    spec = importlib.util.spec_from_file_location("_uniform_triton_on_a_stand_in",
                                                  Path(uniform_cuda.__file__).with_name("uniform_triton.py"))
    uniform_triton = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(uniform_triton)

    fmt = Uniform(bits=bits, group_size=group)
    assert uniform_triton.supports(fmt, torch.zeros(1, k, dtype=torch.float16)) is ok
    if ok:
        packed = fmt.pack(rtn_fields(torch.randn(4, k), fmt))
        assert uniform_triton.prepare(fmt, packed, k)["qweight"].shape == (4, k * bits // 32)


def test_reference_warning_names_the_layer_shape_for_every_format():
    """The one-time "no fast kernel" warning names out × in from the dequantized weight — a PVQ layer's packed
    index has out / dim rows (meta tensors: the warning is skipped on CPU)."""
    from llmcomp.formats.pyramid import Pyramid
    from llmcomp.kernels import dequant_linear

    fmt = Pyramid(dim=8, pulses=4)
    tensors = {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in fmt.param_specs(64, 32).items()}
    with pytest.warns(UserWarning, match="at 64x32 with"):
        assert dequant_linear(torch.empty(1, 32, device="meta"), fmt, tensors, 32).shape == (1, 64)
