"""Every CUDA fast path against the pure-torch reference (runs only where CUDA exists).

Tolerance: ‖y − ref‖∞ / ‖ref‖∞ < 2e-2 where ``ref`` is the fp32 product of the fp32-dequantized weight
and the (fp16/bf16) input. The kernels dequantize into the activation dtype (bf16 keeps 8 mantissa
bits), read ``-zero·scale`` rounded to it, and return ``x.dtype``; the mma kernel accumulates in fp32.
"""
import functools

import pytest
import torch

from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats import Uniform
from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
from llmcomp.quant.fp4 import fp4_fields
from llmcomp.quant.rtn import rtn_fields

pytestmark = pytest.mark.cuda

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (1000, 2048), (48, 320)]
TOL = 2e-2


@functools.lru_cache(maxsize=None)
def _packed(fmt_key, n, k, seed):
    fmt = _FORMATS[fmt_key]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    fields = fp4_fields(w, fmt) if fmt.name in ("mxfp4", "nvfp4", "fp4") else rtn_fields(w, fmt)
    return {kk: v.cuda() for kk, v in fmt.pack(fields).items()}


_FORMATS = {}


def _layer(fmt, n, k, seed):
    """A fresh QuantLinear over packed weights quantized once per (format, shape, seed) (the same weights serve
    every M and dtype), and a generator for the test's inputs."""
    _FORMATS.setdefault(fmt.describe(), fmt)
    t = _packed(fmt.describe(), n, k, seed)
    return QuantLinear.from_packed(fmt, t, k), t, torch.Generator().manual_seed(seed + 1)


def _rel_err(y, x, fmt, t, k):
    ref = torch.nn.functional.linear(x.float(), fmt.dequantize(t, k, dtype=torch.float32))
    return float((y.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_module_matches_reference(bits, group, sym, m, dtype):
    """Whatever path QuantLinear takes on CUDA (mma kernel, Triton, or reference for odd shapes)."""
    fmt = Uniform(bits=bits, group_size=group, symmetric=sym)
    for n, k in SHAPES:
        q, t, g = _layer(fmt, n, k, n + k + bits)
        x = torch.randn(m, k, generator=g).to("cuda", dtype)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == dtype and y.shape == (m, n)
        assert _rel_err(y, x, fmt, t, k) < TOL, (n, k)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_kernel_every_m(bits, group, dtype):
    """The CUDA mma kernel itself, M = 1..300 (64+ goes through its dequantize kernel + cuBLAS), incl. inputs
    that are not whole kblocks (576 at 2/3 bits: codes, scales and x padded)."""
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    fmt = Uniform(bits=bits, group_size=group, symmetric=False)
    # 576: padded for 2/3 bits; 576 and 4160 in groups of 128: a ragged last group of 64 inputs; 200: of 72
    for n, k in [(256, 1024), (4096, 4096), (48, 512), (1536, 512), (192, 576), (1024, 4160), (48, 200)]:
        if not uniform_cuda.shape_ok(fmt, k, n):
            continue
        q, t, g = _layer(fmt, n, k, n * k + bits)
        prep = uniform_cuda.prepare(fmt, t, k)
        for m in [1, 2, 5, 8, 9, 16, 17, 31, 33, 64, 65, 300]:
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            y = uniform_cuda.linear(x, fmt, t, k, None, {})
            assert _rel_err(y, x, fmt, t, k) < TOL, (n, k, m)
        # dequantize kernel: same weight as the reference, rounded to dtype
        w = uniform_cuda.dequantize(prep, k, dtype).float()
        ref = fmt.dequantize(t, k, dtype=torch.float32)
        assert float((w - ref).abs().max() / ref.abs().max()) < 1e-2


def test_odd_shape_falls_back_with_warning():
    from llmcomp import kernels
    from llmcomp.kernels import uniform_cuda

    fmt = Uniform(bits=5, group_size=128)
    q, t, g = _layer(fmt, 40, 200, 1)
    x = torch.randn(2, 200, generator=g).to("cuda", torch.float16)
    assert kernels.fast_path(fmt, x, t, 200) is None
    kernels._WARNED.clear()
    with pytest.warns(UserWarning, match="no fast kernel"):
        with torch.no_grad():
            y = q(x)
    assert _rel_err(y, x, fmt, t, 200) < TOL
    assert not uniform_cuda.shape_ok(Uniform(bits=4, group_size=128), 200, 40)  # rows not a multiple of 16
    assert not uniform_cuda.shape_ok(MXFP4(), 200, 48)  # E2M1 blocks of 32 must divide K


@pytest.mark.parametrize("bits", [4, 3])
def test_custom_op_traces_under_compile(bits):
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    fmt = Uniform(bits=bits, group_size=128)
    q, t, g = _layer(fmt, 512, 1024, 7)
    x = torch.randn(1, 1024, generator=g).to("cuda", torch.float16)
    with torch.no_grad():
        eager = q(x)
        compiled = torch.compile(q, fullgraph=False)(x)
    assert torch.allclose(eager, compiled, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=3, group_size=64),
                                 Uniform(bits=2, group_size=128, symmetric=True), MXFP4(), NVFP4()],
                         ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_frozen_forward_is_forward_in_one_graph(fmt, dtype):
    """QuantLinear.frozen_forward: the same bits as forward at M = 1..64 (incl. the post-scale kernel at M <= 8 and a
    576-input layer padded to whole kblocks), traced by dynamo with fullgraph=True (no graph break), with a bias;
    inputs of another dtype or more rows take forward."""
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    torch._dynamo.reset()  # the closures share one code object: each test's recompiles start from zero
    for n, k in [(512, 1024), (192, 576)]:
        q, t, g = _layer(fmt, n, k, n + k)
        q.bias = torch.nn.Parameter(torch.randn(n, generator=g).to("cuda", dtype), requires_grad=False)
        fwd = q.frozen_forward(dtype)
        if not uniform_cuda.shape_ok(fmt, k, n):  # e.g. groups of 128 on 576 inputs: no kernel, nothing to trace
            assert fwd is None
            continue
        assert fwd is not None
        traced = torch.compile(fwd, fullgraph=True, dynamic=False)
        for m in (1, 5, 16, 64, 65):
            x = torch.randn(2, m, k, generator=g).to("cuda", dtype)[:1]  # [1, m, k]
            with torch.no_grad():
                ref = q(x)
                assert torch.equal(fwd(x), ref), (n, k, m)
                if m in (1, 16):
                    assert torch.equal(traced(x), ref), (n, k, m)
    q, t, g = _layer(fmt, 512, 1024, 3)  # no bias: fp32 inputs take forward (the reference path)
    fwd, x32 = q.frozen_forward(dtype), torch.randn(3, 1024, generator=g).cuda()
    with torch.no_grad():
        y = fwd(x32)
        assert y.dtype == torch.float32 and torch.allclose(y, q(x32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=3, group_size=64), MXFP4()],
                         ids=lambda f: f.describe())
def test_frozen_group_is_its_members_forwards(fmt):
    """qlinear.frozen_group (q/k/v-style siblings stacked into one kernel call): each member's output equals its
    own forward (up to the accumulation order: the stacked call's launch splits K differently) at M = 1..64, with
    a bias on one member; more rows take the members' own forwards; traced together with fullgraph=True."""
    from llmcomp.core.qlinear import frozen_group
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    torch._dynamo.reset()
    dtype = torch.bfloat16
    mods = [_layer(fmt, n, 1024, n + i)[0] for i, n in enumerate((512, 128, 128))]
    mods[1].bias = torch.nn.Parameter(torch.randn(128, device="cuda", dtype=dtype), requires_grad=False)
    fns = frozen_group(mods, dtype)
    assert fns is not None and len(fns) == 3

    def qkv(x):
        return torch.cat([f(x) for f in fns], -1)

    traced = torch.compile(qkv, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for m in (1, 5, 16, 64, 65):
        x = torch.randn(1, m, 1024, generator=g).to("cuda", dtype)
        with torch.no_grad():
            ref = torch.cat([mod(x) for mod in mods], -1)
            tol = 1e-2 * ref.float().abs().max()
            assert (qkv(x).float() - ref.float()).abs().max() <= tol, m
            if m in (1, 16):
                assert (traced(x).float() - ref.float()).abs().max() <= tol, m


E2M1 = [MXFP4(), NVFP4(), FP4(group_size=128), FP4(group_size=32), FP4(group_size=0)]


@pytest.mark.parametrize("fmt", E2M1, ids=lambda f: f.describe())
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_e2m1_module_matches_reference(fmt, m, dtype):
    """MXFP4 / NVFP4 / fp4-E2M1 layers through QuantLinear on CUDA (the mma kernel where the shape allows)."""
    for n, k in SHAPES:
        q, t, g = _layer(fmt, n, k, n + k)
        x = torch.randn(m, k, generator=g).to("cuda", dtype)
        with torch.no_grad():
            y = q(x)
        assert y.dtype == dtype and y.shape == (m, n)
        assert _rel_err(y, x, fmt, t, k) < TOL, (n, k)


@pytest.mark.parametrize("fmt", E2M1, ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_e2m1_mma_kernel_every_m(fmt, dtype):
    """The mma kernel on E2M1 codes, M = 1..300, and its dequantize kernel: bit-exact against the
    reference rounded to ``dtype`` for MXFP4 (power-of-two scales), within one ulp of it otherwise."""
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    for n, k in [(256, 1024), (4096, 4096), (48, 512), (1536, 512), (192, 576)]:  # 576: padded for 2/3 bits
        if not uniform_cuda.shape_ok(fmt, k, n):
            continue
        q, t, g = _layer(fmt, n, k, n * k)
        prep = uniform_cuda.prepare(fmt, t, k)
        for m in [1, 2, 5, 8, 9, 16, 17, 31, 33, 64, 65, 300]:
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            y = uniform_cuda.linear(x, fmt, t, k, None, {})
            assert _rel_err(y, x, fmt, t, k) < TOL, (n, k, m)
        w = uniform_cuda.dequantize(prep, k, dtype)
        ref = fmt.dequantize(t, k, dtype=dtype)
        if fmt.name == "mxfp4":
            assert torch.equal(w, ref), (n, k)
        else:
            ulp = ref.float().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
            assert bool(((w.float() - ref.float()).abs() <= ulp).all()), (n, k)


@pytest.mark.parametrize("fmt", [MXFP4(), NVFP4()], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_e2m1_byte_scales_and_16_bit_scales_agree(fmt, dtype, monkeypatch):
    """MXFP4 / NVFP4 through the byte block scales (elem 9, the default) and the 16-bit ones
    (LLMCOMP_E2M1_BYTE_SCALES=0): both within TOL of the reference at M = 1..64 (and the GLU call), their dequantized
    weights bit-equal for MXFP4 (both exact), within one ulp of each other for NVFP4; weights with block scales ~1000×
    larger (beyond the 16-bit form, which sends them to the reference path) run the byte-scaled kernel, finite."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    n, k = 512, 2048
    _, t, g = _layer(fmt, n, k, 17)
    up = _layer(fmt, n, k, 18)[1]
    preps = {}
    for on in ("1", "0"):
        monkeypatch.setenv("LLMCOMP_E2M1_BYTE_SCALES", on)
        prep = uc.prepare(fmt, t, k)
        assert uc.kernel_elem(prep, dtype) == (9 if on == "1" else 1)
        preps[on] = prep
        glu = uc.glu(fmt, t, up, k, dtype)
        for m in (1, 5, 16, 33, 64):
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            assert _rel_err(uc.gemm(x, prep), x, fmt, t, k) < TOL, (on, m)
            y = uc.gemm_tensors(x, *glu.args, glu=1).float()
            gate, upy = (torch.nn.functional.linear(x.float(), fmt.dequantize(w, k)) for w in (t, up))
            ref = torch.nn.functional.silu(gate) * upy
            assert float((y - ref).abs().max() / ref.abs().max()) < TOL, (on, m)
    w1, w0 = (uc.dequantize(preps[on], k, dtype) for on in ("1", "0"))
    if fmt.name == "mxfp4":
        assert torch.equal(w1, w0)
    else:
        ulp = w0.float().abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
        assert bool(((w1.float() - w0.float()).abs() <= ulp).all())
    monkeypatch.setenv("LLMCOMP_E2M1_BYTE_SCALES", "1")
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(19)) * 50
    tb = {kk: v.cuda() for kk, v in fmt.pack(fp4_fields(w, fmt)).items()}
    prep = uc.prepare(fmt, tb, k)
    assert uc.kernel_elem(prep, dtype) == 9 and uc.scales_fit(prep, dtype)
    x = torch.randn(3, k, generator=g).to("cuda", dtype)
    y = uc.gemm(x, prep)
    assert bool(torch.isfinite(y).all()) and _rel_err(y, x, fmt, tb, k) < TOL


def test_e2m1_large_scales_take_the_reference_path():
    """Block scales whose ``S · 2^14`` overflows fp16 would give inf in the kernel: such a weight takes
    the reference path (same result as the reference, no inf)."""
    fmt = FP4(group_size=64)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * 50
    t = {kk: v.cuda() for kk, v in fmt.pack(fp4_fields(w, fmt)).items()}
    q = QuantLinear.from_packed(fmt, t, 256)
    x = torch.randn(2, 256, generator=g).to("cuda", torch.float16)
    with torch.no_grad():
        y = q(x)
    assert torch.isfinite(y).all() and _rel_err(y, x, fmt, t, 256) < TOL


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=3, group_size=64),
                                 Uniform(bits=2, group_size=32), MXFP4(), NVFP4(), Uniform(bits=3, group_size=128),
                                 Uniform(bits=2, group_size=128)], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_every_launch_config_matches_the_reference(fmt, dtype):
    """Every (row tiles a warp, warps splitting K, row groups a block) the kernel can be launched with —
    launch_config picks among them by shape — gives the reference product within TOL, at M = 1..16, 40 and 64 (one or
    two row tiles a warp; with one warp a row group above 16: x staged in shared memory); 3 row groups a block
    leave the last block partly empty on both shapes. (Groups of 128 for 2/3-bit codes: the post-scale kernels, 2-bit
    codes at M <= 16, 3-bit at M <= 8.)"""
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    # 384: kblocks not a whole number of rounds (x staging's last round); 576: groups of 128 end in a ragged one
    for n, k in [(256, 1024), (48, 384), (64, 576)]:
        q, t, g = _layer(fmt, n, k, n + k)
        prep = uniform_cuda.prepare(fmt, t, k)
        for m in [1, 5, 8, 13, 16, 40, 64]:
            for warps in (1, 2, 4, 8, 16):  # 16: the wide instantiation at M <= 16; 1 above M = 16: x staged
                for rt in (1, 2):  # rt 2 with rows not a multiple of 32 (n = 48): the kernel falls back to one tile
                    for wr in (1, 3):  # the block's threads are clamped to its instantiation (wr shrinks first)
                        x = torch.randn(m, k, generator=g).to("cuda", dtype)  # fresh: stale rows of a reused block fail
                        y = uniform_cuda.gemm(x, prep, (rt, warps, wr))
                        assert _rel_err(y, x, fmt, t, k) < TOL, (n, k, m, warps, rt, wr)


def test_kernel_bench_times_every_column(monkeypatch, tmp_path):
    """Two small rows (M = 1 and 80) of `llmcomp bench kernels --fp16 --float-formats mxfp4` end to end: every
    column timed, ratios formed, JSON written."""
    from llmcomp.eval import kernel_bench

    monkeypatch.setattr(kernel_bench, "ROTATE_BYTES", 32 << 20)
    out = tmp_path / "k.json"
    result = kernel_bench.run([(4096, 4096)], [1, 80], (4,), 128, out, log=lambda *a: None, fp16=True,
                              float_formats=("mxfp4",))
    row, prefill, fp4, _ = result["rows"]
    for col in ("llmcomp", "bf16", "llmcomp_fp16", "fp16"):
        assert row[f"{col}_us"] > 0 and 0 < row[f"{col}_roofline_pct"] < 200, col
    # above the mma kernel's rows: the dequantize of the prefill path timed alone, and only there
    assert "dequant_us" not in row and 0 < prefill["dequant_us"] < prefill["llmcomp_us"]
    assert 0 < prefill["dequant_roofline_pct"] < 200
    assert row["speedup_vs_bf16"] > 0 and row["fp16_speedup_vs_fp16"] > 0
    assert fp4["format"] == "mxfp4" and fp4["llmcomp_us"] > 0 and fp4["speedup_vs_bf16"] > 0
    assert out.exists() and result["fp16"] is True
    assert 0 < result["launch_floor_us"] < row["llmcomp_us"]  # a call that moves nothing: the fixed cost


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_kernel_group_not_a_power_of_two(bits, dtype):
    """Groups of 96 inputs: the kernel's group index is a multiply-high by ceil(2^32 / group), exact for
    K * group < 2^32; a power-of-two group or one group a row would not exercise the rounding."""
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    fmt = Uniform(bits=bits, group_size=96, symmetric=False)
    for n, k in [(256, 1536), (48, 768), (64, 12288)]:
        assert uniform_cuda.shape_ok(fmt, k, n)
        q, t, g = _layer(fmt, n, k, n + k + bits)
        for m in [1, 5, 16, 40]:
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            y = uniform_cuda.linear(x, fmt, t, k, None, {})
            assert _rel_err(y, x, fmt, t, k) < TOL, (n, k, m)


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=4, group_size=128, symmetric=True),
                                 Uniform(bits=4, group_size=0), Uniform(bits=2, group_size=128),
                                 Uniform(bits=3, group_size=128), Uniform(bits=3, group_size=0),
                                 Uniform(bits=4, group_size=96), Uniform(bits=3, group_size=64)],
                         ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_post_scale_kernel_matches_the_reference(fmt, dtype):
    """M <= 16 with integral zeros: the A operand q − z and the scale in fp32 after each kblock's mma (elem 3; for
    3-bit codes, at M <= 8, the kernel's kind 8, the high-bit plane joined to each 2-bit field) — within the usual
    tolerance of the fp32 reference, and at least as close as the per-pair-scale kernel (elem 0), which is what it
    replaces; groups that are not whole kblocks (96 for 4-bit: 1.5 kblocks; 64 for 3-bit) keep elem 0."""
    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    for n, k in [(256, 1536), (4096, 4608), (48, 768), (192, 576)]:  # 576 in groups of 128: a ragged last group
        if not uniform_cuda.shape_ok(fmt, k, n):
            continue
        q, t, g = _layer(fmt, n, k, n + k)
        prep = uniform_cuda.prepare(fmt, t, k)
        assert (prep["zero"] is not None) == (fmt.group(k) % uniform_cuda.kblock(fmt.bits) == 0)
        for m in [1, 2, 5, 8, 9, 13, 16]:
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            y = uniform_cuda.gemm(x, prep)
            assert _rel_err(y, x, fmt, t, k) < TOL, (n, k, m)
            if prep["zero"] is not None:
                xk = uniform_cuda.kernel_input(x, prep["kp"])  # (the ops take x padded to whole kblocks)
                ref_path = uniform_cuda.gemm_op(xk, prep["qw"], uniform_cuda.high_plane(prep),
                                                uniform_cuda.scale_pairs(prep, dtype),
                                                fmt.bits, prep["group"], n, 1, 8, 0)
                assert _rel_err(y, x, fmt, t, k) <= _rel_err(ref_path, x, fmt, t, k) * 1.5 + 1e-3, (n, k, m)
                if fmt.bits == 3 and m > 8:  # the 3-bit post-scale kernel is built for M <= 8 only
                    with pytest.raises(RuntimeError, match="at most 8 rows of x for 3-bit codes"):
                        sz_post = uniform_cuda.scale_pairs(prep, dtype, post=True)
                        uniform_cuda.gemm_op(xk, prep["qw"], prep["qh"], sz_post, 3, prep["group"], n, 1, 8, 3)


def _unaligned(t):
    """A contiguous copy of t that starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    buf[1:] = t.flatten()
    return buf[1:].view(t.shape)


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=2, group_size=128),
                                 Uniform(bits=2, group_size=0), Uniform(bits=3, group_size=128)],
                         ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_norm_split_epilogues_match_the_reference(fmt, dtype):
    """The RMSNorm split around two calls (``norm_producer_op``: y and, with h = res + y, γ ⊙ h and Σ h² a 16-column
    tile; ``norm_consumer_op``: each token scaled by rsqrt(Σ/K + eps), plain or GLU): the producer's y is the plain
    call's bit for bit, its h and γ ⊙ h ``norm_reference``'s of that y bit for bit, its sums within fp32 order; the
    consumer on them is within the GLU/linear call's own error of W · RMSNorm(h) (the norm as transformers computes
    it, then the dequantized weights in fp32) — at every M the epilogue is built for (the post-scale kernel, M ≤ 8),
    every launch configuration, into blocks that held NaN; both ops traced by dynamo (fullgraph) give the eager bits;
    weights without post-scale pairs (groups of 64 for 3-bit codes) or more rows are refused with an error, not run."""
    from torch import _dynamo as dynamo

    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    eps = 1e-5
    for n, k, inter in [(256, 512, 384), (2048, 1536, 768)]:  # o: k → n; the MLP: n → 2 × inter
        o, to, g = _layer(fmt, n, k, n + k)
        gate, tg, _ = _layer(fmt, inter, n, n + 3)
        up, tu, _ = _layer(fmt, inter, n, n + 5)
        if not (uc.shape_ok(fmt, k, n) and uc.shape_ok(fmt, n, 2 * inter)):
            continue
        o_args = uc.kernel_tensors(uc.prepare(fmt, to, k), dtype)
        run = uc.glu(fmt, tg, tu, n, dtype)
        wg, wu, wo = (fmt.dequantize(t, kk, dtype=torch.float32) for t, kk in ((tg, n), (tu, n), (to, k)))
        gamma = (torch.rand(n, generator=g) + 0.5).to("cuda", dtype)

        def err(y, ref):
            return float((y.float() - ref).abs().max() / ref.abs().max())

        def check(m, launch=None):
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            res = (torch.randn(m, n, generator=g) * 4).to("cuda", dtype)
            torch.full((4, m, n), float("nan"), device="cuda", dtype=dtype)  # freed at once: blocks the outputs reuse
            y, h, xn, sq = uc.gemm_tensors(x, *o_args, launch=launch, res=res, gamma=gamma)
            assert torch.equal(y, uc.gemm_tensors(x, *o_args, launch=launch)), (n, m, launch)
            want_h, want_xn, want_sq = uc.norm_reference(y, res, gamma)
            assert sq.shape == (m, n // 16) and sq.dtype == torch.float32
            # h = T(res + T(y)) and T(γ h): one fp32 operation and one rounding each, as the reference: the same bits;
            # the sums of squares in another order
            assert torch.equal(h, want_h) and torch.equal(xn, want_xn), (n, m, launch, err(xn, want_xn.float()))
            assert err(sq, want_sq) < 1e-5, (n, m, launch, err(sq, want_sq))
            produced = (y, h, xn, sq)
            # W · RMSNorm(h) as transformers' LlamaRMSNorm computes the norm
            h = h.float()
            normed = gamma * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
            ref_glu = torch.nn.functional.silu(normed.float() @ wg.T) * (normed.float() @ wu.T)
            got = uc.gemm_tensors(xn, *run.args, launch=launch, glu=1, sq=sq, eps=eps)[0]
            assert got.shape == (m, inter), (n, m, launch)
            assert err(got, ref_glu) < max(TOL, 1.5 * err(run(normed), ref_glu)), (n, m, launch)
            if launch is None:
                # the residual and γ off 16-byte alignment: the producer reads them from global memory, not through
                # norm_stage's shared-memory copies (the default; LLMCOMP_NORM_STAGE=0 turns them off, and
                # bench/norm_session.sh runs both): the same bits
                unaligned = uc.gemm_tensors(x, *o_args, res=_unaligned(res), gamma=_unaligned(gamma))
                assert all(map(torch.equal, unaligned, produced)), (n, m)
            gate_args = uc.kernel_tensors(uc.prepare(fmt, tg, n), dtype)
            got = uc.gemm_tensors(xn, *gate_args, launch=launch, sq=sq, eps=eps)[0]
            ref = normed.float() @ wg.T
            assert err(got, ref) < max(TOL, 1.5 * err(uc.gemm_tensors(normed, *gate_args, launch=launch), ref)), (n, m)

        for m in [1, 3, 8]:
            check(m)
            for launch in [(1, 1, 1), (1, 8, 2), (1, 16, 1), (2, 4, 1), (2, 2, 2), (2, 8, 1), (2, 16, 1), (1, 1, 8)]:
                if not (launch[0] == 2 and (n % 32 or inter % 16)):
                    check(m, launch)
        x = torch.randn(2, k, generator=g).to("cuda", dtype)
        res = torch.randn(2, n, generator=g).to("cuda", dtype)
        dynamo.reset()
        producer = lambda x, res: uc.norm_producer_op(x, *o_args, res, gamma)  # noqa: E731
        eager = producer(x, res)
        assert all(torch.equal(a, b) for a, b in zip(torch.compile(producer, fullgraph=True)(x, res), eager))
        consumer = lambda xn, sq: uc.norm_consumer_op(xn, *run.args, sq, eps, 1)  # noqa: E731
        assert torch.equal(torch.compile(consumer, fullgraph=True)(*eager[2:]), consumer(*eager[2:]))
        with pytest.raises(RuntimeError, match="post-scale kernel at M <= 8"):
            uc.norm_producer_op(torch.randn(9, k, generator=g).to("cuda", dtype), *o_args,
                                torch.randn(9, n, generator=g).to("cuda", dtype), gamma)
    w3, t3, _ = _layer(Uniform(bits=3, group_size=64), 256, 512, 7)
    args3 = uc.kernel_tensors(uc.prepare(w3.fmt, t3, 512), dtype)
    assert args3[3] is None
    with pytest.raises(RuntimeError, match="post-scale kernel at M <= 8"):
        uc.norm_producer_op(torch.randn(1, 512).to("cuda", dtype), *args3, torch.randn(1, 256).to("cuda", dtype),
                            torch.ones(256, device="cuda", dtype=dtype))


def _post_scale_calls(x, args, run, launch, res, gamma, sq) -> dict:
    """The post-scale kernels' uses on x (each returning a list of outputs): plain over ``args``, the GLU call
    ``run``, and at M ≤ 8 both sides of the norm split (residual ``res``, γ, the producer's sums ``sq``)."""
    from llmcomp.kernels import uniform_cuda as uc

    calls = {"plain": lambda: [uc.gemm_tensors(x, *args, launch=launch)],
             "glu": lambda: [uc.gemm_tensors(x, *run.args, launch=launch, glu=1)]}
    if x.shape[0] <= 8:  # the norm epilogue's kernels
        calls["producer"] = lambda: uc.gemm_tensors(x, *args, launch=launch, res=res, gamma=gamma)
        calls["consumer"] = lambda: uc.gemm_tensors(x, *run.args, launch=launch, glu=1, sq=sq, eps=1e-5)
    return calls


def _post_scale_cases(fmt, dtype, shapes, ms):
    """Per weight shape (n, k) and M: ``((n, k, m), args, calls)`` — the weight's kernel tensors and ``calls(launch)``,
    ``_post_scale_calls`` on random x (with a GLU weight, γ, residual and sums of squares of the same shapes)."""
    from llmcomp.kernels import uniform_cuda as uc

    for n, k in shapes:
        _, t, g = _layer(fmt, n, k, n + k)
        args = uc.kernel_tensors(uc.prepare(fmt, t, k), dtype)
        run = uc.glu(fmt, t, _layer(fmt, n, k, n + k + 7)[1], k, dtype)
        gamma = (torch.rand(n, generator=g) + 0.5).to("cuda", dtype)
        for m in ms:
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            res = torch.randn(m, n, generator=g).to("cuda", dtype)
            sq = torch.rand(m, k // 16, generator=g).to("cuda")
            yield (n, k, m), args, functools.partial(_post_scale_calls, x, args, run, res=res, gamma=gamma, sq=sq)


def _mma_kernel_names(run) -> list[str]:
    """The names of the mma kernels (``uniform_mma_kernel*``) the profiler sees ``run()`` launch, in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "uniform_mma_kernel" in e.name]


@pytest.fixture
def unpaired():
    """The early-scale kernels without their kblock pairs (``set_scale_pair``, on by default): the bit-identity
    tests of other switches compare against kernels that scale each kblock (the pairs have their own test,
    ``test_scale_pair_matches_the_unpaired_kernel``)."""
    from llmcomp.kernels import uniform_cuda as uc

    before = uc.scale_pair()
    if before is not None:
        uc.set_scale_pair(False)
    yield
    if before is not None:
        uc.set_scale_pair(bool(before))


def _switch_keeps_bits(set_switch, calls: dict, where: tuple) -> None:
    """Each call's outputs after ``set_switch(False)`` and after ``set_switch(True)``: the same bits."""
    for name, call in calls.items():
        set_switch(False)
        want = call()
        set_switch(True)
        got = call()
        assert all(map(torch.equal, got, want)), (*where, name)


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=3, group_size=64),
                                 Uniform(bits=2, group_size=32), MXFP4(), NVFP4()], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dequant_stage_gives_the_same_bits(fmt, dtype):
    """``set_dequant_stage``: the dequantize kernel with its stores through shared memory gives the unstaged kernel's
    bits — odd row counts (a last block with idle warps), 2 to 64 kblocks a row, padded inputs — and a weight within
    1 % of the reference's (the kernel rounds once to ``dtype``; ``test_e2m1_mma_kernel_every_m`` checks the bits)."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    before = uc.dequant_stage()
    try:
        for n, k in [(48, 256), (272, 1536), (2048, 4096), (112, 576)]:
            if not uc.shape_ok(fmt, k, n):
                continue
            _, t, _ = _layer(fmt, n, k, n + k)
            prep = uc.prepare(fmt, t, k)
            _switch_keeps_bits(uc.set_dequant_stage, {"dequant": lambda: [uc.dequantize(prep, k, dtype)]}, (n, k))
            ref = fmt.dequantize(t, k, dtype=torch.float32).to("cuda")
            w = uc.dequantize(prep, k, dtype).float()
            assert w.shape == ref.shape and float((w - ref).abs().max() / ref.abs().max()) < 1e-2, (n, k)
    finally:
        uc.set_dequant_stage(before)


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=4, group_size=0),
                                 Uniform(bits=2, group_size=256)], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lean_kernel_gives_the_same_bits(fmt, dtype, unpaired):
    """``set_lean``: the post-scale kernels' lean instantiations (M ≤ 16; weights through per-tile pointers advanced a
    round, x's and the scales' row pointers in registers, the group index without the lane's offset) give the plain
    instantiations' bits — plain, GLU, and at M ≤ 8 both sides of the RMSNorm split, at every launch,
    K slices that leave warps idle (24 kblocks over 16 warps) or end mid-round, groups of 1, 2 and 4 kblocks and one
    group a row — and the profiler sees the lean kernel run."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    before = uc.lean()
    launches = [None, (1, 1, 1), (1, 8, 2), (1, 16, 1), (2, 4, 1), (2, 2, 2), (2, 8, 1), (1, 4, 1)]
    try:
        shapes = [(256, 1536), (2048, 4096), (4096, 14336), (512, 4864)]
        for where, args, calls in _post_scale_cases(fmt, dtype, shapes, [1, 2, 5, 8, 12, 16]):
            if args[3] is None:  # no post-scale pairs for this group size: nothing the switch changes
                continue
            for launch in launches:
                if launch is not None and launch[0] == 2 and where[0] % 32:
                    continue
                _switch_keeps_bits(uc.set_lean, calls(launch), (*where, launch))
        uc.set_lean(True)
        _, t, g = _layer(fmt, 2048, 4096, 11)
        args = uc.kernel_tensors(uc.prepare(fmt, t, 4096), dtype)
        if args[3] is not None:
            x = torch.randn(1, 4096, generator=g).to("cuda", dtype)
            names = _mma_kernel_names(lambda: uc.gemm_tensors(x, *args))
            early = args[3] is not None and fmt.bits == 4 and uc.scale_early()  # (the lean kernel loading scales early)
            assert names and all(f", 3, false, false, true, {str(early).lower()}>" in name for name in names), names
    finally:
        uc.set_lean(bool(before))


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=4, group_size=256),
                                 Uniform(bits=4, group_size=64), Uniform(bits=4, group_size=0)],
                         ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scale_early_gives_the_same_bits(fmt, dtype, unpaired):
    """``set_scale_early``: the batch-1 4-bit post-scale kernels loading a round's scale words with
    its weights (one load a pair of kblocks) give the bits of those loading them before each tile's math — plain,
    GLU, both sides of the norm split, at one- and two-tile launches whose warps' ranges are whole rounds or not (odd
    kblocks a warp, ends mid-round) and groups of 1, 2 and 4 kblocks or one a row (pairs across two groups of 1 take
    the usual kernel) — and so do the M = 9..16 kernels under ``set_scale_early16`` (on by default); the profiler
    sees the early kernels run where they apply."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    before, lean_before, se16_before = uc.scale_early(), uc.lean(), uc.scale_early16()
    uc.set_lean(True)  # (scale-early kernels are lean ones)

    def switch(m):  # M <= 8: scale_early itself; M = 9..16: scale_early16 with scale_early on
        if m <= 8:
            return uc.set_scale_early
        return lambda on: (uc.set_scale_early(True), uc.set_scale_early16(on))

    try:  # (224 rows: the last block's last row group has no rows)
        # (576 and 4032 end in a ragged group of 64 inputs in groups of 128 and 256; 4032's 63 kblocks leave the last
        # pair without its second kblock at the launches that split K evenly)
        shapes = [(256, 1536), (2048, 4096), (512, 4864), (4096, 14336), (224, 1536), (256, 576), (512, 4032)]
        for where, _, calls in _post_scale_cases(fmt, dtype, shapes, [1, 3, 8, 12, 16]):
            for launch in [None, (2, 4, 1), (2, 2, 2), (2, 8, 1), (2, 16, 1), (2, 1, 4), (1, 4, 1), (1, 8, 2),
                           (1, 16, 1), (1, 1, 2)]:
                _switch_keeps_bits(switch(where[2]), calls(launch), (*where, launch))
        uc.set_scale_early(True)
        uc.set_scale_early16(True)
        _, t, g = _layer(fmt, 28672, 4096, 11)
        args = uc.kernel_tensors(uc.prepare(fmt, t, 4096), dtype)
        xs = {m: torch.randn(m, 4096, generator=g).to("cuda", dtype) for m in (1, 16)}
        names = _mma_kernel_names(lambda: [uc.gemm_tensors(xs[m], *args, launch=launch)  # (M = 16: two tiles only)
                                           for m, launch in [(1, (2, 4, 1)), (1, (1, 4, 1)), (16, (2, 4, 1))]])
        early = fmt.group_size in (0, 128, 256) and args[3] is not None
        # (in fp16 the two-tile 4-warp kernel runs bounded: uniform_mma_kernel_bounded<..., NORM, LEAN, SE, 7>)
        marks = (", 3, false, false, true, true>", ", 3, false, true, true, 7>")
        assert len(names) == 3 and all(any(k in name for k in marks) is early for name in names), names
    finally:
        uc.set_scale_early(bool(before))
        uc.set_scale_early16(bool(se16_before))
        uc.set_lean(bool(lean_before))


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=4, group_size=256),
                                 Uniform(bits=4, group_size=0)], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scale_pair_matches_the_unpaired_kernel(fmt, dtype):
    """``set_scale_pair``: the early-scale kernels summing each pair of kblocks before scaling it give the unpaired
    kernels' outputs up to fp32 rounding — within 4 units in the last place of the activation type, plus 0.05 of the
    call's largest output times that (outputs that cancel: the norm producer's res + y) — plain, GLU and both sides of
    the norm split, M = 1..16, one- and two-tile launches, warps' ranges ending mid-round, or per-channel starting and
    ending mid-pair (76 kblocks over 4 or 16 warps); and the profiler sees the pair kernels run where they apply. A
    broken pair (a kblock dropped, the wrong group's scale) errs by ~10 % of the outputs."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    before, lean_before, se_before, se16_before = uc.scale_pair(), uc.lean(), uc.scale_early(), uc.scale_early16()
    for set_on in (uc.set_lean, uc.set_scale_early, uc.set_scale_early16):  # (pair kernels are early-scale ones)
        set_on(True)
    eps = torch.finfo(dtype).eps
    try:  # (224 rows: the last block's last row group has no rows; 4864 inputs: 76 kblocks)
        shapes = [(256, 1536), (2048, 4096), (512, 4864), (224, 1536)]
        for where, _, calls in _post_scale_cases(fmt, dtype, shapes, [1, 3, 8, 12, 16]):
            for launch in [None, (2, 4, 1), (2, 2, 2), (2, 8, 1), (2, 16, 1), (1, 4, 1), (1, 8, 2), (1, 16, 1)]:
                for name, call in calls(launch).items():
                    uc.set_scale_pair(False)
                    want = call()
                    uc.set_scale_pair(True)
                    got = call()
                    assert len(got) == len(want), (*where, launch, name)
                    for a, b in zip(got, want):
                        a, b = a.float(), b.float()
                        bound = 4 * eps * (b.abs() + 0.05 * b.abs().max())
                        assert bool(((a - b).abs() <= bound).all()), (*where, launch, name,
                                                                      float((a - b).abs().max()))
        uc.set_scale_pair(True)
        _, t, g = _layer(fmt, 2048, 4096, 11)
        args = uc.kernel_tensors(uc.prepare(fmt, t, 4096), dtype)
        xs = {m: torch.randn(m, 4096, generator=g).to("cuda", dtype) for m in (1, 16)}
        launches = [(1, (2, 8, 1)), (1, (1, 8, 1)), (16, (2, 4, 1))]
        res = torch.randn(1, 2048, generator=g).to("cuda", dtype)
        gamma = torch.rand(2048, generator=g).to("cuda", dtype)
        names = _mma_kernel_names(lambda: [uc.gemm_tensors(xs[m], *args, launch=launch) for m, launch in launches]
                                  + [uc.gemm_tensors(xs[1], *args, launch=(2, 8, 1), res=res, gamma=gamma)])
        assert len(names) == 4 and all("uniform_mma_kernel_pair<" in n for n in names), names
        assert [", 3, true>" in n for n in names] == [False, False, False, True], names  # (NORM: the producer's)
    finally:
        uc.set_scale_pair(bool(before))
        uc.set_scale_early(bool(se_before))
        uc.set_scale_early16(bool(se16_before))
        uc.set_lean(bool(lean_before))


@pytest.mark.parametrize("fmt", [Uniform(bits=3, group_size=128), Uniform(bits=3, group_size=256),
                                 Uniform(bits=3, group_size=0)], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w3_lean_gives_the_same_bits(fmt, dtype):
    """``set_w3_lean``: the plain 3-bit post-scale kernels (kind 8) through the lean loop — the high-bit plane through
    its own pointers — give the bits of the plain loop: plain and GLU (the norm split's calls and the 512-thread
    launches stay as they were: same bits too), one and two row tiles, warps' ranges whole rounds or not, a last row
    group with no rows; and the profiler sees the lean kernels run where they apply, bounded at 128 threads."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    before, lean_before = uc.w3_lean(), uc.lean()
    uc.set_lean(True)
    try:  # (224 rows: the last block's last row group has no rows; 4864 inputs: 38 kblocks)
        shapes = [(256, 1536), (2048, 4096), (512, 4864), (224, 1536)]
        for where, _, calls in _post_scale_cases(fmt, dtype, shapes, [1, 3, 8]):
            for launch in [None, (1, 4, 1), (1, 8, 1), (1, 16, 1), (2, 4, 1), (2, 8, 1), (2, 16, 1), (1, 1, 2),
                           (1, 2, 2), (2, 2, 2), (1, 2, 4)]:
                _switch_keeps_bits(uc.set_w3_lean, calls(launch), (*where, launch))
        uc.set_w3_lean(True)
        _, t, g = _layer(fmt, 2048, 4096, 3)
        args = uc.kernel_tensors(uc.prepare(fmt, t, 4096), dtype)
        x = torch.randn(1, 4096, generator=g).to("cuda", dtype)
        names = _mma_kernel_names(lambda: [uc.gemm_tensors(x, *args, launch=launch)
                                           for launch in [(1, 4, 1), (1, 8, 1), (2, 4, 1)]])
        lean, bounded = ", 8, false, false, true, false>", "_bounded<"
        assert len(names) == 3 and all(lean in name or ", 8, false, true, false, 7>" in name for name in names), names
        assert [bounded in name for name in names] == [bool(uc.bound7()), False, False], names
    finally:
        uc.set_w3_lean(bool(before))
        uc.set_lean(bool(lean_before))


@pytest.mark.parametrize("fmt", [MXFP4(), NVFP4(), FP4(group_size=128), FP4(group_size=0)],
                         ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_e2m1_lean_gives_the_same_bits(fmt, dtype):
    """``set_e2m1_lean``: the E2M1 kernels at M ≤ 8 run lean give the plain kernel's bits — plain and GLU calls, one-
    and two-tile launches, warps ending mid-round or left without kblocks (10 kblocks over 8 warps), 224 rows (the
    last block's last row group has none) — and the profiler sees the lean kernel run at 256-thread blocks or fewer,
    the plain one at 512 (whose launches in the bit loop compare plain with plain)."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    before = uc.e2m1_lean()
    launches = [None, (1, 1, 1), (1, 4, 1), (1, 8, 1), (1, 8, 2), (1, 16, 1), (2, 4, 1), (2, 2, 2), (2, 8, 1),
                (2, 16, 1)]
    try:
        for n, k in [(256, 1536), (2048, 4096), (512, 4864), (224, 1536), (4096, 14336), (256, 640)]:
            if not uc.shape_ok(fmt, k, n):
                continue
            _, t, g = _layer(fmt, n, k, n + k)
            args = uc.kernel_tensors(uc.prepare(fmt, t, k), dtype)
            run = uc.glu(fmt, t, _layer(fmt, n, k, n + k + 7)[1], k, dtype)
            for m in [1, 3, 8]:
                x = torch.randn(m, k, generator=g).to("cuda", dtype)
                for launch in launches:
                    if launch is not None and launch[0] == 2 and n % 32:
                        continue
                    calls = {"plain": lambda: [uc.gemm_tensors(x, *args, launch=launch)]}
                    if run is not None:
                        calls["glu"] = lambda: [uc.gemm_tensors(x, *run.args, launch=launch, glu=1)]
                    _switch_keeps_bits(uc.set_e2m1_lean, calls, (n, k, m, launch))
        _, t, g = _layer(fmt, 2048, 4096, 11)
        args = uc.kernel_tensors(uc.prepare(fmt, t, 4096), dtype)
        x = torch.randn(1, 4096, generator=g).to("cuda", dtype)
        for on in (False, True):
            uc.set_e2m1_lean(on)
            names = _mma_kernel_names(lambda: [uc.gemm_tensors(x, *args, launch=launch)
                                               for launch in [(2, 4, 1), (1, 4, 1), (1, 16, 1)]])
            elem = args[7]  # 1, or 9: byte block scales (MXFP4, NVFP4)
            lean = [f", {elem}, false, false, true, false>" in name for name in names]
            assert lean == [on, on, False] and all(f", 512, {elem}, false" in n for n in names[2:]), (on, names)
    finally:
        uc.set_e2m1_lean(bool(before))


@pytest.mark.parametrize("fmt", [Uniform(bits=3, group_size=128), Uniform(bits=4, group_size=128),
                                 Uniform(bits=4, group_size=64), Uniform(bits=4, group_size=0),
                                 Uniform(bits=2, group_size=128)], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_register_bound_gives_the_same_bits(fmt, dtype, unpaired):
    """``set_bound7`` (3-bit codes, one row tile × 4 warps) and ``set_bound7_r2`` (the lean two-tile kernels at 4
    warps): the kernels bounded to 7 blocks an SM give the unbounded kernels' bits — plain, GLU and both sides of the
    norm split, M = 1..8, warps ending mid-round (the 2-bit layouts' 12 kblocks over 4) or left without kblocks (5
    over 4; 4-bit codes: 24 and 10), 4-bit groups that load their scales early (128, one a row) or not (64) — and the
    profiler sees a bounded kernel run at the switch's launch only, where its rule bounds it: 3-bit in fp16 and in the
    norm epilogue, 4-bit in fp16, 2-bit always."""
    from llmcomp.kernels import uniform_cuda as uc

    if uc.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    three, fp16 = fmt.bits == 3, dtype == torch.float16
    get, set_bound = (uc.bound7, uc.set_bound7) if three else (uc.bound7_r2, uc.set_bound7_r2)
    tiles = 1 if three else 2
    before = get()
    try:
        for where, args, calls in _post_scale_cases(fmt, dtype, [(256, 1536), (2048, 4096), (224, 640)], [1, 3, 8]):
            for launch in [None, (tiles, 4, 1)]:
                if not (tiles == 2 and where[0] % 32):
                    _switch_keeps_bits(set_bound, calls(launch), (*where, launch))
        _, t, g = _layer(fmt, 2048, 4096, 11)
        args = uc.kernel_tensors(uc.prepare(fmt, t, 4096), dtype)
        x = torch.randn(1, 4096, generator=g).to("cuda", dtype)
        set_bound(True)
        res = torch.randn(1, 2048, generator=g).to("cuda", dtype)
        gamma = torch.rand(2048, generator=g).to("cuda", dtype)
        names = _mma_kernel_names(lambda: [uc.gemm_tensors(x, *args, launch=launch)
                                           for launch in [(tiles, 4, 1), (tiles, 8, 1), (3 - tiles, 4, 1)]]
                                  + [uc.gemm_tensors(x, *args, launch=(tiles, 4, 1), res=res, gamma=gamma)])
        plain, norm = ((fp16 or bool(uc.lean() and uc.w3_lean())), True) if three else (fp16, fp16) \
            if fmt.bits == 4 else (True, True)
        assert ["kernel_bounded" in n for n in names] == [plain, False, False, norm], names
    finally:
        set_bound(bool(before))


@pytest.mark.parametrize("fmt", [Uniform(bits=4, group_size=128), Uniform(bits=3, group_size=128),
                                 Uniform(bits=2, group_size=128), Uniform(bits=4, group_size=96),
                                 Uniform(bits=2, group_size=0), MXFP4(), NVFP4()], ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_glu_epilogue_matches_the_reference(fmt, dtype):
    """The gated MLP's gate and up in one call (``uniform_cuda.glu``: rows interleaved 8 and 8 a tile, silu(gate) ·
    up in the epilogue): against silu(x Wgᵀ) · (x Wuᵀ) in fp32 from the dequantized weights, at every M the kernel
    takes and above (the dequantized path), every launch configuration (one or two row tiles a warp, 1–16 warps
    splitting K, row groups, x staged), inputs padded to whole kblocks (576 per-channel 2-bit); each launch on a
    fresh x into a block that held NaN, so a column left unwritten fails; ``glu_op`` traced by dynamo (fullgraph)
    gives the eager bits; shapes the kernel refuses give None. E2M1 too (``prepare_glu``: each member's block
    multipliers interleaved; NVFP4's gate and up with different tensor scales), and the interleaved layout's
    dequantize kernel is the members' row for row, bit for bit."""
    from torch import _dynamo as dynamo

    from llmcomp.kernels import uniform_cuda

    if uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    for n, k in [(256, 1536), (48, 576), (48, 768), (2048, 4608)]:
        gate, tg, g = _layer(fmt, n, k, n + k)
        up, tu, _ = _layer(fmt, n, k, n + k + 7)
        run = uniform_cuda.glu(fmt, tg, tu, k, dtype)
        if not uniform_cuda.shape_ok(fmt, k, 2 * n):
            assert run is None
            continue
        wg, wu = (fmt.dequantize(t, k, dtype=torch.float32) for t in (tg, tu))
        pg, pu = (uniform_cuda.prepare(fmt, t, k) for t in (tg, tu))
        if fmt.name == "nvfp4":
            assert not torch.equal(tg["weight_global_scale"], tu["weight_global_scale"])
        # the prefill path's weight (GluCall.dense): 8 gate rows, then their 8 up rows a tile, each the member's bits
        both = uniform_cuda.dequantize(run.prep, k, dtype).reshape(-1, 2, 8, k)
        assert torch.equal(both[:, 0].reshape(n, k), uniform_cuda.dequantize(pg, k, dtype))
        assert torch.equal(both[:, 1].reshape(n, k), uniform_cuda.dequantize(pu, k, dtype))

        def err(y, ref):
            return float((y.float() - ref).abs().max() / ref.abs().max())

        def check(m, launch=None):
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            ref = torch.nn.functional.silu(x.float() @ wg.T) * (x.float() @ wu.T)
            torch.full((m, n), float("nan"), device="cuda", dtype=dtype)  # freed at once: the block y may reuse
            y = run(x) if launch is None else uniform_cuda.gemm_tensors(x, *run.args, launch=launch, glu=1)
            assert y.shape == (m, n) and y.dtype == dtype
            # the product of two projections doubles their error: as close as TOL, or as the unfused calls it
            # replaces (bf16 3-bit codes with a bf16 zero: 3.6 % at 48 x 768, on the H200); a wrong pairing or a
            # column left unwritten is off by the outputs' size (or NaN)
            unfused = torch.nn.functional.silu(uniform_cuda.gemm(x, pg).float()) * uniform_cuda.gemm(x, pu).float() \
                if m <= 64 else ref
            assert err(y, ref) < max(TOL, 1.5 * err(unfused, ref)), (n, k, m, launch, err(unfused, ref))

        for m in [1, 3, 8, 9, 16, 17, 40, 64, 65, 130]:
            check(m)
            for launch in [(1, 1, 1), (1, 4, 1), (1, 8, 2), (1, 16, 1), (2, 4, 1), (2, 2, 2), (2, 8, 1), (1, 1, 8),
                           (1, 2, 4)]:
                if m <= 64 and not (launch[0] == 2 and (2 * n) % 32):
                    check(m, launch)
        x = torch.randn(2, k, generator=g).to("cuda", dtype)
        dynamo.reset()
        assert torch.equal(torch.compile(run, fullgraph=True)(x), run(x))
