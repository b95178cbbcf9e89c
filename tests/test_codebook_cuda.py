"""The codebook (VQ) CUDA mma path: its prepared layout read the kernel's way on CPU (CI), which formats and shapes
it takes, and on CUDA the kernel against the reference."""
import subprocess
import sys
import textwrap

import pytest
import torch

from llmcomp.core.qlinear import QuantLinear
from llmcomp.eval.kernel_bench import random_codebook as packed
from llmcomp.formats.codebook import Codebook
from llmcomp.kernels import codebook_cuda, fast_path

FORMATS = [Codebook(dim=4, bits=(8,)), Codebook(dim=4, bits=(8, 4)), Codebook(dim=4, bits=(6, 3), scale=False),
           Codebook(dim=4, bits=(8,), outliers=1 / 17)]


def _read_like_the_kernel(prep: dict) -> torch.Tensor:
    """W [N, main columns] from the planes, in the kernel's reading order: lane 4g + c, byte 2s + r = the index of
    vector 8c + s of row g + 8r; the second stage's nibble 2s + r; then the row scale."""
    q0 = codebook_cuda.mma_planes(prep)["qw"].view(torch.uint8).long()  # [NT, KB, 32, 16]
    nt, kb = q0.shape[:2]
    tab = prep["table32"]
    ent = tab[q0.reshape(nt, kb, 8, 4, 8, 2)]  # [tile, kb, g, c, s, r, 4]
    if prep["qh"] is not None:
        nb = prep["qh"].view(torch.uint8).long()  # [NT, KB, 32, 8]: byte b holds nibbles 2b (low) and 2b + 1
        nib = torch.stack([nb & 15, nb >> 4], dim=-1).reshape(nt, kb, 8, 4, 8, 2)
        ent = ent + tab[prep["cb1_at"] + nib]
    w = ent.permute(0, 5, 2, 1, 3, 4, 6).reshape(nt * 16, kb * 128)  # rows (tile, r, g), inputs (kb, c, s, j)
    return w * prep["scale"]


def _cpu_case(fmt, k: int, seed: int, n: int = 48):
    """(n, k, prep, reference weight, main columns) of a random codebook weight on CPU (64 outlier columns more)."""
    k = k + 64 if fmt.outliers else k
    t = packed(fmt, n, k, seed)
    prep = codebook_cuda.prepare(fmt, t, k)
    return n, k, prep, fmt.dequantize(t, k), prep.get("main_cols", torch.arange(k))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("k", [1024, 576], ids=["whole-kblocks", "padded"])
def test_prepared_layout_rebuilds_the_weight(fmt, k):
    """The layout read the kernel's way is the reference weight at the main columns; main inputs that are not
    whole kblocks of 128 (the bundled model's 576) are padded with entry 0, which meets zero x."""
    n, k, prep, ref, cols = _cpu_case(fmt, k, 3)
    kp = codebook_cuda.padded_main(len(cols))
    read = _read_like_the_kernel(prep)
    assert prep["kp"] == kp == read.shape[1] and torch.equal(read[:, :len(cols)], ref[:, cols])
    if "outlier_cols" in prep:
        assert torch.allclose(prep["outlier_f32"], ref[:, prep["outlier_cols"]])
    assert prep["qw"].dtype == torch.int32 and prep["qw"].shape == (n // 16, kp // 128, 32, 4)
    assert (prep["qh"] is None) == (len(fmt.bits) == 1)


def _read_lut_planes(prep: dict) -> torch.Tensor:
    """W [N, padded inputs] from the lookup-table GEMV's planes (row-major once ``unbatch``ed), read its way: byte j of
    int32 word q = stage-0 index of vector 4q + j, nibble j of int16 word q = stage-1 index; then the row scale."""
    lut = codebook_cuda.lut_planes(prep)
    n = prep["n"]
    tab = prep["table32"]
    ent = tab[codebook_cuda.unbatch(lut["i0"]).view(torch.uint8).long()]  # [N, kl / 4, 4]
    if lut["i1"] is not None:
        # byte 2q: vectors 4q (low nibble), 4q + 1; byte 2q + 1: 4q + 2, 4q + 3
        b = codebook_cuda.unbatch(lut["i1"]).view(torch.uint8).long()
        ent = ent + tab[prep["cb1_at"] + torch.stack([b & 15, b >> 4], dim=-1).reshape(n, -1)]
    return ent.reshape(n, -1) * lut["scale"][:, None]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("k", [1024, 576], ids=["whole-slices", "padded"])
def test_lut_planes_rebuild_the_weight(fmt, k):
    """The one-row kernel's planes, derived from the mma layout, read its way give the reference weight at the main
    columns, padded with entry 0 to whole slices of 512 inputs (which meet zero x); counters start at zero, and the
    chunks cover the rows in 16-row steps."""
    n, k, prep, ref, cols = _cpu_case(fmt, k, 5)
    lut = codebook_cuda.lut_planes(prep)
    assert lut is codebook_cuda.lut_planes(prep)  # built once
    kl = -(-len(cols) // 512) * 512
    assert lut["kl"] == kl and lut["i0"].shape == (kl // 512, n // 16, 4, 32, 4) and lut["i0"].dtype == torch.int32
    assert (lut["i1"] is None) == (len(fmt.bits) == 1)
    if lut["i1"] is not None:  # stage 1: int16 words, two 16-byte pieces of 8 rows a lane and batch
        assert lut["i1"].shape == (kl // 512, n // 16, 2, 32, 8) and lut["i1"].dtype == torch.int16
    read = _read_lut_planes(prep)
    assert torch.equal(read[:, :len(cols)], ref[:, cols])
    i0 = codebook_cuda.unbatch(lut["i0"])
    pad = torch.zeros(n, (kl - len(cols)) // 4, dtype=torch.uint8)
    assert torch.equal(i0.view(torch.uint8)[:, len(cols) // 4:], pad)
    rpc = lut["rows_per_chunk"]
    assert rpc % 16 == 0 and lut["counters"].numel() == -(-n // rpc) and not lut["counters"].any()
    assert lut["part"].numel() == kl // 512 * n


@pytest.mark.parametrize("ns", [(4096, 1024, 1024), (14336, 14336), (48, 16), (1536, 512, 512), (8192, 1024, 1024),
                                (6144, 4096, 14336), (8192, 64, 64), (4096, 16, 16)])
def test_group_chunks_stay_within_their_weights(ns):
    """The grouped GEMV's chunks: increasing starts from 0 to the total, whole batches, never across two weights,
    each weight at least one chunk and the codebook of the weight it lies in, no more than one wave in all."""
    starts, book = codebook_cuda.group_chunks(list(ns), 4096, 256, 132)
    bounds = [sum(ns[:g]) for g in range(len(ns) + 1)]
    assert starts[0] == 0 and starts[-1] == bounds[-1] and len(book) == len(starts) - 1
    assert all(b > a and (b - a) % 16 == 0 for a, b in zip(starts, starts[1:]))
    assert set(bounds) <= set(starts) and sorted(set(book)) == list(range(len(ns)))
    for c, g in enumerate(book):
        assert bounds[g] <= starts[c] < starts[c + 1] <= bounds[g + 1], (c, g)
    want, _ = codebook_cuda.lut_launch(sum(ns), 4096, 256, 132)
    assert len(book) <= max(want, len(ns))  # one wave (llama3-8b q / k / v: 16 chunks of 8 slices on 132 SMs)


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.describe())
def test_lut_group_stacks_its_members(fmt):
    """``lut_group``: the members' index words (by batch) concatenated along the rows, codebooks one after another
    (stride: one codebook's entries), scales in order; None for members of different formats or with outlier
    columns."""
    preps = [_cpu_case(fmt, 1024, seed, n)[2] for seed, n in ((1, 64), (2, 32), (3, 32))]
    group = codebook_cuda.lut_group(preps)
    i0, i1, tab, e0, cb1_at, stride, scale, part, counters, n, kl, starts, book, threads, prmt = group
    own = [codebook_cuda.lut_planes(p) for p in preps]
    assert n == 128 and kl == 1024 and stride == preps[0]["table32"].shape[0] and e0 == preps[0]["e0"]
    assert torch.equal(codebook_cuda.unbatch(i0), torch.cat([codebook_cuda.unbatch(o["i0"]) for o in own]))
    if len(fmt.bits) == 2:
        assert torch.equal(codebook_cuda.unbatch(i1), torch.cat([codebook_cuda.unbatch(o["i1"]) for o in own]))
    else:
        assert i1 is None
    assert torch.equal(tab, torch.cat([p["table32"] for p in preps]))
    assert torch.equal(scale, torch.cat([o["scale"] for o in own]))
    assert part.numel() == kl // 512 * n and counters.numel() == book.numel() and not counters.any()
    assert starts.tolist() == codebook_cuda.group_chunks([64, 32, 32], kl, codebook_cuda._lut_entries(preps[0]),
                                                         132, threads)[0]
    other = FORMATS[1] if fmt is FORMATS[0] else FORMATS[0]
    assert codebook_cuda.lut_group([preps[0], _cpu_case(other, 1024, 4)[2]]) is None
    assert codebook_cuda.lut_group([preps[0], _cpu_case(FORMATS[3], 1024 - 64, 4)[2]]) is None


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_by_batch_is_read_as_the_kernel_reads(dtype):
    """csrc/vq_lut.cu's index loads, as index arithmetic on the flat buffer: lane l's 16-byte piece q of a batch
    sits at 16-byte offset (slice · N/16 + batch) · 32 · 16 / per + 32 q + l and holds rows 16 / Q · q + j of word
    slice · 32 + l (per words a piece); ``unbatch`` undoes it."""
    n, w = 48, 64  # 3 batches, 2 slices
    words = torch.randint(-2**15, 2**15, (n, w), dtype=torch.int32).to(dtype)
    flat = codebook_cuda.by_batch(words).reshape(-1)
    per = 16 // words.element_size()
    for sl in range(w // 32):
        for b in range(n // 16):
            for lane in range(32):
                for q in range(16 // per):
                    piece = (sl * (n // 16) + b) * 32 * 16 // per + 32 * q + lane
                    got = flat[piece * per:(piece + 1) * per]
                    assert torch.equal(got, words[16 * b + per * q:16 * b + per * (q + 1), sl * 32 + lane])
    assert torch.equal(codebook_cuda.unbatch(codebook_cuda.by_batch(words)), words)


def test_lut_launch_one_wave():
    """Slices × chunks fill the SMs in one wave, rows a chunk whole 16-row batches."""
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (48, 1024), (16, 8192)]:
        chunks, rows = codebook_cuda.lut_launch(n, k, 256, 132)
        assert rows % 16 == 0 and chunks * rows >= n > (chunks - 1) * rows and chunks * (k // 512) <= 132, (n, k)
    assert codebook_cuda.lut_launch(4096, 4096, 256, 132) == (16, 256)


def test_each_kernel_builds_its_own_planes():
    """``prepare`` builds neither index layout; the one-row GEMV's call builds only its own (batch-1 decode holds
    one copy of the indices), the mma kernel's only its own, each once."""
    fmt = Codebook(dim=4, bits=(8, 4))
    n, k, prep, ref, cols = _cpu_case(fmt, 1024, 7)
    assert "qw" not in prep and "lut" not in prep
    lut = codebook_cuda.lut_planes(prep)
    assert "qw" not in prep and codebook_cuda.lut_planes(prep) is lut
    qw = codebook_cuda.mma_planes(prep)["qw"]
    assert codebook_cuda.mma_planes(prep)["qw"] is qw and prep["lut"] is lut


def test_lut_threads_setting(monkeypatch):
    """The block size: 1024 unless set; a setting other than 512 or 1024 is named in one clear error."""
    monkeypatch.delenv("LLMCOMP_VQ_LUT_THREADS", raising=False)
    codebook_cuda._lut_env.cache_clear()
    try:
        assert codebook_cuda.lut_threads() == 1024
        codebook_cuda._lut_env.cache_clear()
        monkeypatch.setenv("LLMCOMP_VQ_LUT_THREADS", "512")
        assert codebook_cuda.lut_threads() == 512
        codebook_cuda._lut_env.cache_clear()
        monkeypatch.setenv("LLMCOMP_VQ_LUT_THREADS", "many")
        with pytest.raises(ValueError, match="LLMCOMP_VQ_LUT_THREADS must be 512 or 1024, not 'many'"):
            codebook_cuda.lut_threads()
        codebook_cuda._lut_env.cache_clear()
        monkeypatch.setenv("LLMCOMP_VQ_LUT_THREADS", "768")  # a number the kernel has no build for
        with pytest.raises(ValueError, match="LLMCOMP_VQ_LUT_THREADS must be 512 or 1024, not '768'"):
            codebook_cuda.lut_threads()
    finally:
        monkeypatch.delenv("LLMCOMP_VQ_LUT_THREADS", raising=False)
        codebook_cuda._lut_env.cache_clear()


def test_lut_prmt_setting(monkeypatch):
    """The table's addressing: PRMT with two stages by default (measured ahead there, behind with one); 1 / 0 force
    it; ``set_lut`` overrides; anything else is one clear error. Which weights take the GEMV: by their size."""
    monkeypatch.delenv("LLMCOMP_VQ_LUT_PRMT", raising=False)
    codebook_cuda._lut_env.cache_clear()
    try:
        assert (codebook_cuda.lut_prmt(1), codebook_cuda.lut_prmt(2)) == (False, True)
        codebook_cuda.set_lut(None, prmt=True)
        assert codebook_cuda.lut_prmt(1)
        codebook_cuda.set_lut(None)
        for value, want in (("1", (True, True)), ("0", (False, False))):
            codebook_cuda._lut_env.cache_clear()
            monkeypatch.setenv("LLMCOMP_VQ_LUT_PRMT", value)
            assert (codebook_cuda.lut_prmt(1), codebook_cuda.lut_prmt(2)) == want
        codebook_cuda._lut_env.cache_clear()
        monkeypatch.setenv("LLMCOMP_VQ_LUT_PRMT", "yes")
        with pytest.raises(ValueError, match="LLMCOMP_VQ_LUT_PRMT must be 0 or 1, not 'yes'"):
            codebook_cuda.lut_prmt(1)
        monkeypatch.delenv("LLMCOMP_VQ_LUT_PRMT")
        codebook_cuda._lut_env.cache_clear()
        assert codebook_cuda.lut_takes(4096, 14336) and codebook_cuda.lut_takes(28672, 4096)
        assert codebook_cuda.lut_takes(4096, 4096) and not codebook_cuda.lut_takes(4096, 4080)
        assert not codebook_cuda.lut_takes(1024, 4096)
    finally:
        codebook_cuda.set_lut(None)
        monkeypatch.delenv("LLMCOMP_VQ_LUT_PRMT", raising=False)
        codebook_cuda._lut_env.cache_clear()


def test_which_formats_and_shapes_it_takes():
    ok = Codebook(dim=4, bits=(8, 4))
    assert codebook_cuda.shape_ok(ok, 4096, 4096) and codebook_cuda.shape_ok(Codebook(dim=4, bits=(5,)), 256, 32)
    assert codebook_cuda.shape_ok(ok, 4096 + 64, 4096)  # main columns not whole kblocks of 128: padded
    assert not codebook_cuda.shape_ok(ok, 4096, 4096 + 8)  # rows not whole 16-row tiles
    for fmt in (Codebook(dim=8, bits=(8,)), Codebook(dim=4, bits=(8,), group=128), Codebook(dim=4, bits=(10,)),
                Codebook(dim=4, bits=(8, 8)), Codebook(dim=4, bits=(4, 4, 4))):
        assert not codebook_cuda.shape_ok(fmt, 4096, 4096), fmt.describe()
    assert not codebook_cuda.supports(ok, torch.zeros(1, 4096), 4096, 4096)  # CPU tensors: never


def test_table_copies():
    """16 bank-replicated copies of the table when asked and it holds at most 512 entries (272 for 8 + 4 bits:
    34 KB of shared memory), else one."""
    prep = codebook_cuda.prepare(Codebook(dim=4, bits=(8, 4)), packed(Codebook(dim=4, bits=(8, 4)), 32, 256, 0), 256)
    assert prep["table32"].shape[0] == 272
    assert codebook_cuda.copies(prep, True) == 16 and codebook_cuda.copies(prep, False) == 1
    assert codebook_cuda.copies({"table32": torch.zeros(513, 4)}, True) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_reference(fmt, dtype):
    """Through QuantLinear (the registered fast path) at M = 1..64 and every launch configuration at M = 1, 16, 64:
    within 2 % of the fp32 reference product (the codebook entries are rounded to the activation dtype once);
    the bank-replicated table and the single table give the same bits."""
    if codebook_cuda.uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    for n, k in [(48, 1088 if fmt.outliers else 1024), (4096, 4352 if fmt.outliers else 4096),
                 (1536, 640 if fmt.outliers else 576)]:  # 576: main inputs padded to whole kblocks
        t = packed(fmt, n, k, n + k, "cuda")
        q = QuantLinear.from_packed(fmt, t, k)
        ref_w = fmt.dequantize(t, k)
        prep = codebook_cuda.prepare(fmt, t, k)
        for m in (1, 3, 8, 9, 16, 17, 40, 64):
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref = torch.nn.functional.linear(x.float(), ref_w)
            assert fast_path(fmt, x, t, k) is not None
            with torch.no_grad():
                y = q(x)
            assert y.dtype == dtype and float((y.float() - ref).abs().max() / ref.abs().max()) < 2e-2, (n, k, m)
            if m in (1, 16, 64):
                for warps in (1, 4, 8, 16):
                    for wr in (1, 3):
                        y = codebook_cuda.gemm(x, prep, (warps, wr))
                        err = float((y.float() - ref).abs().max() / ref.abs().max())
                        assert err < 2e-2, (n, k, m, warps, wr)
                        # the bank-replicated table and the single one: the same lookups, bit for bit
                        for rep in (True, False):
                            assert torch.equal(codebook_cuda.gemm(x, prep, (warps, wr), replicated=rep), y), rep


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lut_gemv_matches_reference(fmt, dtype):
    """The one-row lookup-table GEMV (``gemm`` at M = 1, forced below ``LUT_MIN_WEIGHTS``): within 0.5 % of the fp32
    reference product (its tables are fp32; only the output is rounded; 1 % with outlier columns, whose product is
    added in the activation dtype), the same bits on every call (partials added in slice order; the chunk counters
    left at zero), whatever the chunking (one chunk, 16-row chunks, the default), block size (512, 1024 threads)
    and table addressing (PRMT: the same bits), launched with dependent launch or not; and the mma kernel within
    2 %."""
    if codebook_cuda.uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    codebook_cuda.set_lut(True, force=True)  # at any number of rows (by default from LUT_MIN_WEIGHTS)
    try:
        _lut_cases(fmt, dtype)
    finally:
        codebook_cuda.set_lut(None)
    assert codebook_cuda.lut_takes(4096, 4096) and not codebook_cuda.lut_takes(1024, 4096)


def _lut_cases(fmt, dtype):
    for n, k in [(48, 1088 if fmt.outliers else 1024), (4096, 4352 if fmt.outliers else 4096),
                 (1536, 640 if fmt.outliers else 576), (2048, 14336), (6144, 1024)]:
        t = packed(fmt, n, k, n + k + 1, "cuda")
        ref_w = fmt.dequantize(t, k)
        prep = codebook_cuda.prepare(fmt, t, k)
        x = torch.randn(1, k, device="cuda").to(dtype)
        ref = torch.nn.functional.linear(x.float(), ref_w)
        y = codebook_cuda.gemm(x, prep)
        assert y.dtype == dtype and y.shape == (1, n)
        tol = 1e-2 if fmt.outliers else 5e-3
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        assert err < tol, (n, k, err)
        lut = codebook_cuda.lut_planes(prep)
        assert torch.equal(codebook_cuda.gemm(x, prep), y) and not lut["counters"].any()
        before = bool(codebook_cuda.uniform_cuda.dependent_launch())
        codebook_cuda.uniform_cuda.set_dependent_launch(True)  # launched with PDL, twice back to back: the same bits
        try:
            assert torch.equal(codebook_cuda.gemm(x, prep), y) and torch.equal(codebook_cuda.gemm(x, prep), y)
        finally:
            codebook_cuda.uniform_cuda.set_dependent_launch(before)
        mma = codebook_cuda.gemm(x, prep, codebook_cuda.launch_config(n, prep["kp"], 1, codebook_cuda.copies(prep)))
        assert float((mma.float() - ref).abs().max() / ref.abs().max()) < 2e-2
        xm = x.index_select(1, prep["main_cols"]) if "main_cols" in prep else x
        args = list(codebook_cuda._lut_args(prep))
        for rpc, threads, prmt in ((16, 512, False), (n, 512, False), (16, 1024, False), (n, 1024, False),
                                   (16, 512, True), (n, 512, True), (16, 1024, True), (n, 1024, True)):
            args[-3:] = rpc, threads, prmt
            args[-6] = torch.zeros(-(-n // rpc), dtype=torch.int32, device="cuda")  # the chunk counters
            y2 = codebook_cuda.add_outliers(codebook_cuda.lut_gemm_tensors(xm, *args), x, prep)
            assert float((y2.float() - ref).abs().max() / ref.abs().max()) < tol, (n, k, rpc, threads, prmt)
            assert not args[-6].any()
            if rpc == n:  # one chunk: the same bits whatever the table's addressing
                assert torch.equal(y2, codebook_cuda.add_outliers(codebook_cuda.lut_gemm_tensors(
                    xm, *args[:-1], not prmt), x, prep)), (n, k, threads)
        codebook_cuda.set_lut(False)
        try:
            assert torch.equal(codebook_cuda.gemm(x, prep), mma)  # off: the mma kernel at its default launch
        finally:
            codebook_cuda.set_lut(True, force=True)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("one_row", ["mma", "lut"])
def test_frozen_forward_is_forward_in_one_graph(fmt, one_row):
    """QuantLinear.frozen_forward over the codebook kernels (outlier columns in plain torch): the same bits as
    forward, and dynamo traces it with fullgraph=True — one row of x by the mma kernel or the lookup-table GEMV."""
    if codebook_cuda.uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    codebook_cuda.set_lut(one_row == "lut", force=True)
    try:
        _frozen_case(fmt)
    finally:
        codebook_cuda.set_lut(None)


def _frozen_case(fmt):
    n, k = 1536, (640 if fmt.outliers else 576)
    q = QuantLinear.from_packed(fmt, packed(fmt, n, k, 3, "cuda"), k)
    fwd = q.frozen_forward(torch.bfloat16)
    assert fwd is not None
    torch._dynamo.reset()
    traced = torch.compile(fwd, fullgraph=True, dynamic=False)
    for m in (1, 9, 64, 65):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            ref = q(x)
            assert torch.equal(fwd(x), ref), m
            if m in (1, 9):
                y = traced(x)
                if fmt.outliers:  # inductor fuses the outlier product's add: one bf16 rounding instead of two
                    assert float((y.float() - ref.float()).abs().max()) <= 1e-2 * float(ref.float().abs().max()), m
                else:
                    assert torch.equal(y, ref), m


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS[:3], ids=lambda f: f.describe())
def test_frozen_group_is_its_members(fmt):
    """Codebook siblings (q / k / v-like, each with its own codebook) through ``qlinear.frozen_group``: at one row
    the grouped GEMV, the same bits as each member's own GEMV (a row's slices are added in the same order however
    the rows are chunked) — alone, with a bias on one member and traced with fullgraph=True; at 2..64 rows each
    member's mma kernel (the same bits as its forward); more rows take the members' own forwards. Weights with
    outlier columns: no group."""
    from llmcomp.core.qlinear import frozen_group

    if codebook_cuda.uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    codebook_cuda.set_lut(True, force=True)
    try:
        k, dtype = 1024, torch.bfloat16
        mods = [QuantLinear.from_packed(fmt, packed(fmt, n, k, n + i, "cuda"), k)
                for i, n in enumerate((1536, 256, 256))]
        mods[1].bias = torch.nn.Parameter(torch.randn(256, device="cuda", dtype=dtype), requires_grad=False)
        fns = frozen_group(mods, dtype)
        assert fns is not None and len(fns) == 3
        torch._dynamo.reset()
        traced = torch.compile(lambda x: torch.cat([f(x) for f in fns], -1), fullgraph=True, dynamic=False)
        for m in (1, 9, 64, 65):
            x = torch.randn(1, m, k, device="cuda").to(dtype)
            with torch.no_grad():
                ref = torch.cat([mod(x) for mod in mods], -1)
                assert torch.equal(torch.cat([f(x) for f in fns], -1), ref), m
                if m in (1, 9):
                    assert torch.equal(traced(x), ref), m
        outl = [QuantLinear.from_packed(FORMATS[3], packed(FORMATS[3], 256, k + 64, 7 + i, "cuda"), k + 64)
                for i in range(2)]
        assert frozen_group(outl, dtype) is None
    finally:
        codebook_cuda.set_lut(None)


_EXTENSION_ERRORS = textwrap.dedent("""
    import torch
    from llmcomp.kernels import uniform_cuda
    ext, z = uniform_cuda.extension(), torch.zeros(16, device="cuda")
    x = torch.zeros(1, 512, device="cuda", dtype=torch.float16)
    calls = {"vq_lut": lambda: ext.vq_lut(x, z, z, z, 1, 0, z, z, z, 16, 16, 768, False),
             "gemm": lambda: ext.gemm(torch.zeros(65, 512, device="cuda", dtype=torch.float16), z, z, z, 4, 128,
                                      16, 1, 4, 0, 1, 0)}
    for name, k, n in (("gemm-k", 700, 64), ("gemm-n", 768, 40)):  # K not whole kblocks, N not whole row tiles
        calls[name] = lambda k=k, n=n: ext.gemm(torch.zeros(1, k, device="cuda", dtype=torch.bfloat16), z, z,
                                                torch.zeros(n, 11, dtype=torch.int32, device="cuda"), 4, 128, n, 1, 8,
                                                0, 1, 0)
    from llmcomp.formats import Uniform  # groups of 96 split a 4-bit kblock (64): refused by the post-scale kernel
    from llmcomp.quant.rtn import rtn_fields
    fmt = Uniform(bits=4, group_size=96)
    prep = uniform_cuda.prepare(fmt, {k: v.cuda() for k, v in fmt.pack(rtn_fields(torch.randn(64, 768), fmt)).items()},
                                768)
    calls["gemm-post"] = lambda: ext.gemm(torch.zeros(1, 768, device="cuda", dtype=torch.bfloat16), prep["qw"],
                                          prep["qw"], uniform_cuda.scale_pairs(prep, torch.bfloat16), 4, prep["group"],
                                          64, 1, 8, 3, 1, 0)
    fmt = Uniform(bits=4, group_size=128)  # the post-scale kernel at M = 9..16 with one row tile a warp: refused
    p16 = uniform_cuda.prepare(fmt, {k: v.cuda() for k, v in fmt.pack(rtn_fields(torch.randn(64, 768), fmt)).items()},
                               768)
    calls["gemm-post16"] = lambda: ext.gemm(torch.zeros(12, 768, device="cuda", dtype=torch.bfloat16), p16["qw"],
                                            p16["qw"], uniform_cuda.scale_pairs(p16, torch.bfloat16, post=True), 4,
                                            p16["group"], 64, 1, 8, 3, 1, 0)
    calls["gemm-codes"] = lambda: ext.gemm(torch.zeros(1, 1024, device="cuda", dtype=torch.bfloat16), p16["qw"],
                                           p16["qw"], uniform_cuda.scale_pairs(p16, torch.bfloat16), 4,
                                           p16["group"], 64, 1, 8, 0, 1, 0)  # x's K (1024) not the codes' (768)
    for name, call in calls.items():
        try:
            call()
        except RuntimeError as e:
            print(name, "raised:", str(e).splitlines()[0])
""")


@pytest.mark.cuda
def test_extension_checks_raise():
    """A check that fails inside the CUDA extension (TORCH_CHECK) reaches Python as a RuntimeError with its message,
    not a crash — run in a child process so that a crash fails this test instead of ending the run. (On the H200,
    kernel-lut-ring's test of a check thrown inside a launch template's lambda ended the whole run with a segfault.)"""
    if codebook_cuda.uniform_cuda.extension() is None:
        pytest.skip("CUDA extension could not be built here")
    r = subprocess.run([sys.executable, "-c", _EXTENSION_ERRORS], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "vq_lut raised: threads: 512 or 1024" in r.stdout, r.stdout
    assert "gemm raised: the mma kernel takes at most 64 rows of x" in r.stdout, r.stdout
    for name in ("gemm-k", "gemm-n"):  # (bench/ext_probe.py made these calls on the H200: both raised)
        assert f"{name} raised: shape not supported by the mma kernel" in r.stdout, r.stdout
    assert "gemm-post raised: the post-scale kernel needs groups of whole kblocks" in r.stdout, r.stdout
    want = "gemm-post16 raised: the fp32 post-scale kernel at M = 9..16 takes two row tiles a warp"
    assert want in r.stdout, r.stdout
    assert "gemm-codes raised: the codes must hold n rows of x's K inputs" in r.stdout, r.stdout
