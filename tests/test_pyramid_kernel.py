"""The PVQ (``pyramid``) CUDA fast path: its prepared layout on CPU (CI) — codes, scales and escapes give back the
reference weight bit for bit, the escape lists are where the kernel looks — and the kernel against the reference
on CUDA (M = 1..300, fp16 / bf16, escapes, rotation, every launch)."""
import pytest
import torch
import torch.nn.functional as F

from llmcomp.core.qlinear import QuantLinear
from llmcomp.eval.kernel_bench import random_pyramid
from llmcomp.formats.pyramid import Pyramid
from llmcomp.kernels import fast_path
from llmcomp.kernels import pyramid_cuda as pc

# (format, heavy tail of the random groups): escapes from none to ~1 % of the pulses; tiles a row group 4, 2, 1
CASES = [(Pyramid(dim=64, pulses=38), 0.0), (Pyramid(dim=64, pulses=87, norm_bits=6), 0.5),
         (Pyramid(dim=32, pulses=87, rotate=True, seed=5), 0.5), (Pyramid(dim=16, pulses=40, norm_bits=4), 0.3),
         (Pyramid(dim=48, pulses=30), 0.5)]
IDS = ["N64K38", "N64K87-escapes", "N32K87-hadamard", "N16K40-escapes", "N48K30"]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error of y against ref, relative to ref's largest entry."""
    return float((y.float() - ref).abs().max() / ref.abs().max())


def _unrotated(fmt: Pyramid) -> Pyramid:
    return Pyramid(dim=fmt.dim, pulses=fmt.pulses, norm_bits=fmt.norm_bits)


def test_layout_round_trip():
    codes = torch.randint(0, 16, (48, 192), generator=torch.Generator().manual_seed(0))
    qw = pc.layout(codes)
    assert qw.shape == (3, 3, 32, 4) and qw.dtype == torch.int32
    assert torch.equal(pc.codes_of(qw), codes)
    # lane (g, c) = (1, 2), kblock 1 of tile 0, chunk 0: nibble 0 is row g, input 16 + 2c; nibble 7 row g + 8,
    # input 16 + 8 + 2c + 1 (the mma's A fragment: csrc/pvq_mma.cu)
    word = int(qw[0, 0, 1 * 4 + 2, 1]) & 0xFFFFFFFF
    assert word & 0xF == codes[1, 16 + 4] and word >> 28 == codes[9, 16 + 8 + 4 + 1]


def _add_escapes(w, ptr, pos, val, chunks: int, rows: int):
    """Add escape lists into ``w`` [N, ≥ K] at the positions the kernel decodes them: entries ptr[rg · chunks + c] ..
    ptr[+ 1] of row group rg (``rows`` rows), chunk c; pos = input << 6 | row within the group."""
    for key in range(len(ptr) - 1):
        for e in range(int(ptr[key]), int(ptr[key + 1])):
            row, kk = (key // chunks) * rows + int(pos[e] & 63), int(pos[e] >> 6)
            assert kk // pc.CHUNK == key % chunks and int(pos[e] & 63) < rows
            w[row, kk] += val[e]
    return w


@pytest.mark.parametrize("fmt,tail", CASES, ids=IDS)
def test_prepared_layout_rebuilds_the_weight(fmt, tail):
    """Codes, scales and escapes evaluated in torch give the stored (rotated) weight bit for bit; the escapes are
    listed by row group and chunk with the positions the kernel decodes."""
    n, k = 4 * fmt.dim, 300
    t = random_pyramid(fmt, n, k, 1, tail=tail)
    prep = pc.prepare(fmt, t, k)
    assert torch.equal(pc.dequantize_layout(prep), _unrotated(fmt).dequantize(t, k))
    codes = pc.codes_of(prep["qw"])
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15 and bool((codes[:, k:] == 8).all())
    if tail:
        assert pc.escape_fraction(prep) > 0
    # escapes as the kernel finds them, for every row-group size
    y, scale = fmt.points_and_scales(t, k)
    want = (y.float() - y.float().clamp(pc.LOW, pc.HIGH)) * scale.repeat_interleave(fmt.dim, 0)
    chunks = prep["qw"].shape[1]
    for r in pc.tile_options(fmt.dim):
        ptr, pos, val = pc.escapes(prep, r)
        assert ptr.dtype == pos.dtype == torch.int32 and len(ptr) == n // (16 * r) * chunks + 1
        rest = _add_escapes(torch.zeros(n, k), ptr, pos, val, chunks, 16 * r)
        assert torch.equal(rest, want), r


def test_prepare_in_slices_is_prepare_whole(monkeypatch):
    fmt = Pyramid(dim=32, pulses=87, rotate=True, seed=1)
    t = random_pyramid(fmt, 7 * 32, 200, 5, tail=0.5)
    whole = pc.prepare(fmt, t, 200)
    monkeypatch.setattr(pc, "PREPARE_WEIGHTS", 2 * 32 * 200)  # two groups' rows at a time: 4 slices
    sliced = pc.prepare(fmt, t, 200)
    for name, v in whole.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sliced[name]), name
    assert pc.escape_fraction(whole) > 0 and torch.equal(pc.escapes(whole, 2)[1], pc.escapes(sliced, 2)[1])


def test_which_shapes_take_the_kernel():
    assert pc.shape_ok(Pyramid(dim=64), 576, 576) and pc.shape_ok(Pyramid(dim=16), 7, 32)
    assert not pc.shape_ok(Pyramid(dim=8), 576, 576)  # a group must be whole 16-row tiles
    assert not pc.shape_ok(Pyramid(dim=24), 576, 576)
    assert [pc.tile_options(d) for d in (16, 32, 48, 64)] == [(1,), (1, 2), (1,), (1, 2, 4)]
    fmt = Pyramid(dim=16, pulses=8, norm_bits=4)
    t = random_pyramid(fmt, 32, 64)
    assert fast_path(fmt, torch.zeros(1, 64), t, 64) is None  # CPU: the reference


def test_launch_config_fills_the_machine():
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (576, 576), (64, 100)]:
        for dim in (16, 32, 64):
            r, warps, splits = pc.launch_config(n, k, dim, 132)
            assert r in pc.tile_options(dim) and warps in (4, 8, 16) and splits >= 1
            assert splits == 1 or splits * warps * 2 <= -(-k // 64)  # at least two chunks a warp when split
    # one wave of 16-warp blocks where the rows allow (sweep_pvq2_v2_h200_s32.json: 4096 x 4096 (2, 16, 1) best)
    assert pc.launch_config(4096, 4096, 64, 132) == (2, 16, 1) and pc.launch_config(576, 576, 64, 132) == (1, 16, 1)
    # at least one block an SM of the largest row groups: 8 warps (sweep_pvq2_h200_s33.json: 14336 x 4096 (4, 8, 1))
    assert pc.launch_config(14336, 4096, 64, 132) == (4, 8, 1)
    assert pc.launch_config(28672, 8192, 64, 132) == (4, 8, 1)
    for m in (1, 8, 9, 16, 17, 32):  # above 8 rows of x: a launch the extension builds
        for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (576, 576)]:
            for dim in (16, 32, 64):
                r, warps, splits = pc.launch_config(n, k, dim, 132, m)
                assert pc.valid_launch(r, warps, pc.n_tiles(m)), (m, n, k, dim)
    assert pc.launch_config(4096, 4096, 64, 132, 32) == (2, 8, 1)
    # dense escapes above 8 rows of x: row groups of at most 2 tiles (sweep_pvq3_final_h200_s34.json)
    assert pc.launch_config(14336, 4096, 64, 132, 16, dense=True) == (2, 8, 1)
    assert pc.launch_config(14336, 4096, 64, 132, 8, dense=True) == (4, 8, 1)
    assert pc.launch_config(4096, 4096, 64, 132, 16, dense=True) == pc.launch_config(4096, 4096, 64, 132, 16)
    assert pc.launch_config(4096, 14336, 64, 132, 16, dense=True) == (2, 16, 1)


def test_launches_the_extension_builds():
    assert [pc.n_tiles(m) for m in (1, 8, 9, 16, 17, 32)] == [1, 1, 2, 2, 4, 4]
    built = {nt: sorted((r, w) for r in (1, 2, 4) for w in (4, 8, 16) if pc.valid_launch(r, w, nt))
             for nt in (1, 2, 4)}
    assert len(built[1]) == 9 and not pc.valid_launch(1, 8, 8)
    assert built[2] == [(1, 8), (1, 16), (2, 8), (2, 16), (4, 8)] and built[4] == [(1, 8), (1, 16), (2, 8)]
    assert (2, 8, 1) in pc.launches(64, 32, 64) and (4, 8, 1) not in pc.launches(64, 32, 64)
    assert (4, 16, 1) in pc.launches(64, 1, 64) and (4, 16, 1) not in pc.launches(64, 16, 64)


class _TorchKernel:
    """The extension's two PVQ entry points in torch, reading their operands exactly as csrc/pvq_mma.cu does (codes
    by tile and lane, scales by group, escapes by row group and chunk) — so the Python side (rotation, padding,
    launch arguments, escape lists, the escapes written into a dequantized weight) runs on CPU."""

    def pvq_gemm(self, x, qw, s, dim, esc_ptr, esc_pos, esc_val, part, counters, n, r, warps, splits):
        assert x.shape[1] == s.shape[1] == qw.shape[1] * pc.CHUNK and x.shape[0] <= pc.MAX_M
        assert pc.valid_launch(r, warps, pc.n_tiles(x.shape[0])) and (splits == 1 or part.numel() >= splits * n * 8
                                                                      * pc.n_tiles(x.shape[0]))
        w = _add_escapes(pc.layout_weight(qw, s, dim), esc_ptr, esc_pos, esc_val, qw.shape[1], 16 * r)
        return (x.float() @ w.T).to(x.dtype)

    def pvq_dequant(self, qw, s, dim, n, k, bf16):
        return pc.layout_weight(qw, s, dim)[:, :k].to(torch.bfloat16 if bf16 else torch.float16)


@pytest.mark.parametrize("fmt,tail", CASES, ids=IDS)
def test_python_side_with_the_kernel_in_torch(monkeypatch, fmt, tail):
    monkeypatch.setattr(pc.uniform_cuda, "extension", lambda: _TorchKernel())
    monkeypatch.setattr(pc, "_sms", lambda index: 132)
    n, k = fmt.dim * 4, 300  # inputs not a multiple of 64: x is padded for the kernel
    t = random_pyramid(fmt, n, k, 2, tail=tail)
    prep = pc.prepare(fmt, t, k)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = F.linear(x.float(), fmt.dequantize(t, k))
    for m in (1, 8, 12, 32, 40):  # 40: dequantize + matmul
        built = [(r, 8, 1) for r in pc.tile_options(fmt.dim) if m > pc.MAX_M or pc.valid_launch(r, 8, pc.n_tiles(m))]
        for launch in [None, *built]:
            y = pc.gemm(x[:m], prep, launch)
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            assert _rel(y, want[:m]) < 2e-2, (m, launch)
    w = pc.dequant_op(prep["qw"], prep["s"], fmt.dim, n, k, prep["esc_index"], prep["esc_w"], torch.float16)
    assert torch.equal(w, _unrotated(fmt).dequantize(t, k, dtype=torch.float16))  # escapes written back exactly
    run = pc.frozen(fmt, t, k, torch.bfloat16)
    assert all(torch.equal(run(x[:m]), pc.gemm(x[:m], prep)) for m in (3, 12, 32, 40))


def test_dense_escapes_take_the_kernel_only_up_to_16_rows(monkeypatch):
    calls = []

    class Counting(_TorchKernel):
        def pvq_gemm(self, *args):
            calls.append("kernel")
            return super().pvq_gemm(*args)

        def pvq_dequant(self, *args):
            calls.append("dequant")
            return super().pvq_dequant(*args)

    monkeypatch.setattr(pc.uniform_cuda, "extension", lambda: Counting())
    monkeypatch.setattr(pc, "_sms", lambda index: 132)
    k = 300
    x = torch.randn(33, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    dense_seen = set()
    for fmt, tail in CASES[:2]:
        t = random_pyramid(fmt, fmt.dim * 4, k, 2, tail=tail)
        prep = pc.prepare(fmt, t, k)
        dense = pc.escape_fraction(prep) > pc.DENSE_ESCAPES
        assert pc.dense(prep) == dense
        dense_seen.add(dense)
        run = pc.frozen(fmt, t, k, torch.bfloat16)
        for m in (1, 8, 9, 16, 17, 32, 33):
            want = "kernel" if m <= (pc.DENSE_MAX_M if dense else pc.MAX_M) else "dequant"
            for f in (lambda x2: pc.gemm(x2, prep), run):
                calls.clear()
                f(x[:m])
                assert calls == [want], (fmt, m, dense)
        calls.clear()
        pc.gemm(x[:32], prep, (1, 8, 1))  # an explicit launch takes the kernel up to MAX_M
        assert calls == ["kernel"]
    assert dense_seen == {False, True}


# -- CUDA -------------------------------------------------------------------------------------------------


def _rel_err(y, x, fmt, t, k):
    return _rel(y, F.linear(x.float(), fmt.dequantize(t, k, dtype=torch.float32)))


TOL = 2e-2


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,tail", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_reference(fmt, tail, dtype):
    for n, k in [(fmt.dim * 3, 100), (fmt.dim * 4, 576), (fmt.dim * 16, 1000), (fmt.dim * 64, 4096)]:
        t = random_pyramid(fmt, n, k, n + k, "cuda", tail)
        q = QuantLinear.from_packed(fmt, t, k, out_features=n)
        g = torch.Generator(device="cuda").manual_seed(k)
        assert fast_path(fmt, torch.zeros(1, k, device="cuda", dtype=dtype), t, k) is not None
        for m in (1, 2, 3, 5, 8, 9, 17, 32, 33, 300):
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            with torch.no_grad():
                y = q(x)
            assert y.dtype == dtype and y.shape == (m, n)
            assert _rel_err(y, x, fmt, t, k) < TOL, (n, k, m)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,tail", CASES[:2] + CASES[3:4], ids=[IDS[0], IDS[1], IDS[3]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_every_launch_matches_the_reference(fmt, tail, dtype):
    n, k = fmt.dim * 8, 1600
    t = random_pyramid(fmt, n, k, 7, "cuda", tail)
    prep = pc.prepare(fmt, t, k)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = fmt.dequantize(t, k, dtype=torch.float32)
    for m in (1, 4, 8, 12, 24, 32):
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        ref = F.linear(x.float(), w)
        for r in pc.tile_options(fmt.dim):
            for warps in (4, 8, 16):
                if not pc.valid_launch(r, warps, pc.n_tiles(m)):  # not built: a clear error, never a wrong answer
                    with pytest.raises(RuntimeError, match="not built"):
                        pc.gemm(x, prep, (r, warps, 1))
                    continue
                for splits in (1, 2, 3, 7, 25):
                    y = pc.gemm(x, prep, (r, warps, splits))
                    assert _rel(y, ref) < TOL, (m, r, warps, splits)
                    assert int(prep["counters"].abs().sum()) == 0  # left zero for the next call


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,tail", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dequantize_is_bit_exact(fmt, tail, dtype):
    n, k = fmt.dim * 5, 333
    t = random_pyramid(fmt, n, k, 3, "cuda", tail)
    prep = pc.prepare(fmt, t, k)
    w = pc.dequant_op(prep["qw"], prep["s"], prep["dim"], n, k, prep["esc_index"], prep["esc_w"], dtype)
    assert torch.equal(w, _unrotated(fmt).dequantize(t, k, dtype=dtype))


@pytest.mark.cuda
def test_frozen_forward_traces_in_one_graph():
    fmt = Pyramid(dim=32, pulses=87, rotate=True, seed=2)
    n, k = 256, 640
    t = random_pyramid(fmt, n, k, 4, "cuda", 0.5)
    q = QuantLinear.from_packed(fmt, t, k, out_features=n)
    run = q.frozen_forward(torch.bfloat16)
    assert run is not None
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    for m in (1, 8, 20):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            eager, traced = q(x), compiled(x)
        assert torch.allclose(eager.float(), traced.float(), rtol=1e-2, atol=1e-2 * float(eager.float().abs().max()))
