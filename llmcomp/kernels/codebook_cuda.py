"""CUDA fast path for the ``codebook`` format (VPTQ-style VQ): the mma dequant-GEMM of ``uniform_cuda`` with the
weights looked up in shared-memory codebooks (``csrc/uniform_mma.cuh``, ELEM 4 / 5), for 1–64 rows of x.

Takes 4-vectors with one codebook a layer (``group`` 0), a first stage of ≤ 8 index bits and an optional second
of ≤ 4 (VPTQ's 2- and 3-bit settings), 16 | N and 128 | the main input columns. Outlier columns are multiplied
apart (their dequantized weights, once per dtype); anything else takes the next path (Triton, opt-in) or the
reference.

Layout (built once per weight at its first call by ``mma_planes``): the kernel's 2-bit shape — 16-row tiles ×
kblocks of 128 inputs, lane (g, c) owning inputs [32c, 32c + 32) of a kblock, i.e. vectors 8c … 8c + 7 — and per
lane 16 bytes: byte
2s + r = the stage-0 index of vector 8c + s of row g + 8r; the second stage's indices as nibbles in the same order
(8 bytes a lane). The codebooks become one table [entries, 4] in the activation dtype (stage 1's from row
2**bits[0]); the per-row scale is applied to the fp32 accumulators. In shared memory the table is replicated 16
times across the bank pairs (``replicate``), each lane reading its own copy, so random indices never make a
half-warp's lookups collide on a bank (with one table they did, several ways on average).

One row of x (decode at batch 1) on weights of ``LUT_MIN_WEIGHTS`` or more takes a lookup-table GEMV instead
(``csrc/vq_lut.cu``; ``LLMCOMP_VQ_LUT=0`` or ``set_lut(False)`` turns it off): a block computes the dot products of
x with every codebook entry for a slice of 128 vectors, and a row's sum is then one 4-byte lookup per index. It
reads the indices stored by batch (``lut_planes``, ``by_batch``, built at the first one-row call; a weight that
also meets 2–64 rows holds both layouts, +2 / +3 bits a weight of GPU memory, as does every ``frozen`` one) and
splits K into slices whose partial sums the last block of each chunk of rows adds in order (deterministic; scratch
per weight, so one weight must not run on two streams at once).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from llmcomp.kernels import uniform_cuda
from llmcomp.kernels.codebook_triton import add_outliers, outlier_part
from llmcomp.kernels.switches import env_off


def shape_ok(fmt, in_features: int, out_features: int) -> bool:
    stages_ok = (len(fmt.bits) == 1 and fmt.bits[0] <= 8) or (len(fmt.bits) == 2 and fmt.bits[0] <= 8
                                                                and fmt.bits[1] <= 4)
    return fmt.dim == 4 and fmt.group == 0 and stages_ok and out_features % 16 == 0  # main inputs: padded


def supports(fmt, x: torch.Tensor, out_features: int, in_features: int) -> bool:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    return (x.dtype in (torch.float16, torch.bfloat16) and 1 <= rows <= uniform_cuda.MAX_M
            and shape_ok(fmt, in_features, out_features) and uniform_cuda.extension() is not None)


def _lanes(idx: torch.Tensor) -> torch.Tensor:
    """Indices [N, nv] → [N/16, nv/32, 32 lanes, 16] in the kernel's order (lane 4g + c, slot 2s + r = vector
    8c + s of row g + 8r)."""
    n, nv = idx.shape
    t = idx.reshape(n // 16, 2, 8, nv // 32, 4, 8)  # [tile, r, g, kb, c, s]
    return t.permute(0, 3, 2, 4, 5, 1).reshape(n // 16, nv // 32, 32, 16)


def padded_main(n_main: int) -> int:
    """Main inputs rounded up to whole kblocks (the kernel's 2-bit shape; ``planes`` pads the indices with entry 0,
    ``gemm`` x with zeros, so the padded vectors add nothing): the bundled model's 576 inputs become 640."""
    return uniform_cuda.padded_k(n_main, 2)


def _padded(fields: dict, t: int, vectors: int) -> torch.Tensor:
    """Stage ``t``'s indices [N, nv] as int64, padded with entry 0 to ``vectors`` a row."""
    idx = fields[f"index{t}"].to(torch.int64)
    return torch.nn.functional.pad(idx, (0, vectors - idx.shape[1]))


def _pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """Stage-1 indices (< 16) paired along the last axis into bytes: element 2i in the low nibble, 2i + 1 high."""
    return (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8).contiguous()


def planes(fields: dict, two: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stage-0 bytes as int32 [N/16, KB, 32, 4], stage-1 nibbles as int32 [N/16, KB, 32, 2] or None: ``two``
    stages), the vectors padded to whole kblocks."""
    nv = padded_main(fields["index0"].shape[1] * 4) // 4
    q0 = _lanes(_padded(fields, 0, nv)).to(torch.uint8).contiguous().view(torch.int32)
    if not two:
        return q0, None
    return q0, _pack_nibbles(_lanes(_padded(fields, 1, nv))).view(torch.int32)


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    """What both codebook kernels share (table, scales, outlier columns, shape); each kernel's index planes are
    built from the packed tensors at its first call (``mma_planes``, ``lut_planes``), so a weight that only ever
    meets one row of x (batch-1 decode) holds only the lookup-table GEMV's."""
    f = fmt.unpack(tensors, in_features)
    n = f["index0"].shape[0]
    table = torch.cat([f[f"codebook{t}"].float().reshape(-1, 4) for t in range(len(fmt.bits))])
    scale = f["scale"].float() if fmt.scale else torch.ones(n, device=table.device)
    prep = {"fields": functools.partial(fmt.unpack, tensors, in_features), "table32": table, "tables": {},
            "cb1_at": (1 << fmt.bits[0]) if len(fmt.bits) == 2 else 0, "e0": 1 << fmt.bits[0],
            "scale": scale.reshape(n, 1).contiguous(), "n": n, "kp": padded_main(fmt.n_main(in_features))}
    prep.update(outlier_part(fmt, f, scale, in_features))
    return prep


def _two(prep: dict) -> bool:
    """Whether the weight has a second (residual) stage: its entries then start at ``cb1_at`` > 0."""
    return prep["cb1_at"] > 0


def _stages(prep: dict) -> int:
    return 2 if _two(prep) else 1


def mma_planes(prep: dict) -> dict:
    """The mma kernel's index planes in ``prep`` (``qw``, ``qh``: ``planes``), built at the first call."""
    if "qw" not in prep:
        prep["qw"], prep["qh"] = planes(prep["fields"](), _two(prep))
    return prep


LUT_INPUTS = 512  # inputs one block of the lookup-table GEMV covers (csrc/vq_lut.cu)


def lut_launch(n: int, k: int, entries: int, sms: int, threads: int = 1024) -> tuple[int, int]:
    """(chunks of rows, rows a chunk) for the lookup-table GEMV: K / 512 slices × chunks blocks in one wave. Blocks
    an SM: as many as the shared memory takes (the table: 512 bytes an entry) and the registers (every build holds
    at least 64 a thread: one block of 1024 threads, two of 512)."""
    slices = k // LUT_INPUTS
    per_sm = max(1, min(65536 // (64 * threads), (227 << 10) // (entries * 512 + entries * 16)))
    chunks = max(1, min(n // 16, sms * per_sm // slices))
    rows = -(-n // chunks)
    rows = -(-rows // 16) * 16
    return -(-n // rows), rows


def by_batch(words: torch.Tensor) -> torch.Tensor:
    """A row's index words [N, K / 16] stored as the GEMV reads them: [K / 512, N / 16, Q, 32, 16 / Q] —
    slice, 16-row batch, 16-byte load q, lane (word slice * 32 + lane), row 16 / Q · q + j (Q = 4 for int32 words,
    2 for int16) — so each of a warp's loads of a batch reads one contiguous 512 bytes."""
    n, w = words.shape
    per = 16 // words.element_size()
    return words.view(n // 16, 16 // per, per, w // 32, 32).permute(3, 0, 1, 4, 2).contiguous()


def unbatch(words: torch.Tensor) -> torch.Tensor:
    """``by_batch`` undone: [N, K / 16]."""
    s, b, q, lanes, j = words.shape
    return words.permute(1, 2, 4, 0, 3).reshape(b * q * j, s * lanes)


def lut_planes(prep: dict) -> dict:
    """The lookup-table GEMV's operands (kept in ``prep["lut"]``, built at the first call): the indices padded to
    whole slices of 512 inputs — stage 0 as int32 words of 4 index bytes, stage 1 as int16 words of 4 nibbles, N · K
    / 16 words each, stored by batch (``by_batch``: [K / 512, N / 16, Q, 32, 16 / Q]) as ``i0`` / ``i1`` — with its
    launch, partial-sum scratch and zeroed chunk counters."""
    lut = prep.get("lut")
    if lut is None:
        lut = prep["lut"] = _lut_launch_state(prep)
        lut["i0"], lut["i1"] = _lut_words(prep, lut["kl"])
    return lut


def _lut_words(prep: dict, kl: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(i0, i1): the weight's index words padded to ``kl`` inputs, stored by batch (``lut_planes``)."""
    f = prep["fields"]()
    w0 = _padded(f, 0, kl // 4).to(torch.uint8).contiguous().view(torch.int32)
    i1 = by_batch(_pack_nibbles(_padded(f, 1, kl // 4)).view(torch.int16)) if _two(prep) else None
    return by_batch(w0), i1


def _lut_kl(prep: dict) -> int:
    """The GEMV's inputs: the main columns padded to whole slices of ``LUT_INPUTS``."""
    return -(-prep["kp"] // LUT_INPUTS) * LUT_INPUTS


def _lut_entries(prep: dict) -> int:
    """Entries of the GEMV's table (its shared memory): the PRMT form holds 256 of stage 0 (and 16 of stage 1)
    whatever the codebook."""
    if lut_prmt(_stages(prep)):
        return 256 + (16 if _two(prep) else 0)
    return prep["table32"].shape[0]


def _sms(dev: torch.device) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132


def _scratch(kl: int, n: int, chunks: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMV launch's partial sums (one a slice and row) and its zeroed chunk counters."""
    return torch.empty(kl // LUT_INPUTS * n, device=dev), torch.zeros(chunks, dtype=torch.int32, device=dev)


def _lut_launch_state(prep: dict) -> dict:
    """The GEMV's launch (chunks of rows), partial-sum scratch and zeroed chunk counters for this weight."""
    n, kl = prep["n"], _lut_kl(prep)
    dev = prep["table32"].device
    chunks, rpc = lut_launch(n, kl, _lut_entries(prep), _sms(dev), lut_threads())
    part, counters = _scratch(kl, n, chunks, dev)
    return {"kl": kl, "rows_per_chunk": rpc, "scale": prep["scale"].reshape(n), "part": part, "counters": counters}


def group_chunks(ns: list[int], k: int, entries: int, sms: int, threads: int = 1024) -> tuple[list[int], list[int]]:
    """(row starts, codebooks) of the grouped GEMV's chunks for weights of ``ns`` rows stacked in that order: no more
    chunks in all than ``lut_launch`` gives the stacked rows (one wave) unless there are more weights, shared among
    the weights in proportion to their rows (whole shares, then the largest remainders), at least one each, none
    across two weights, every chunk whole batches of 16 rows. The starts end with the total; chunk c takes the
    codebook of the weight it lies in."""
    total = sum(ns)
    want, _ = lut_launch(total, k, entries, sms, threads)
    share = [want * n / total for n in ns]
    count = [min(n // 16, max(1, int(s))) for n, s in zip(ns, share)]
    for g in sorted(range(len(ns)), key=lambda g: int(share[g]) - share[g]):  # the largest remainders first
        if sum(count) >= want:
            break
        count[g] = min(ns[g] // 16, count[g] + 1)
    while sum(count) > max(want, len(ns)):  # small weights' one chunk each taken from the weight with the most
        count[count.index(max(count))] -= 1
    starts, book, row = [], [], 0
    for g, (n, c) in enumerate(zip(ns, count)):
        rows = -(-(-(-n // c)) // 16) * 16  # ceil(n / c), rounded up to whole batches
        for r in range(0, n, rows):
            starts.append(row + r)
            book.append(g)
        row += n
    return starts + [total], book


def lut_group(preps: list[dict]) -> Optional[tuple]:
    """The grouped GEMV's operands after x (``lut_group_tensors``) for weights that multiply the same x (q / k / v,
    gate / up), stacked along the rows: their index words concatenated batch after batch (the by-batch layout is
    batch-major within a slice), their codebooks one after another, scales, chunk starts and codebooks, scratch and
    zeroed counters. None where they differ in what one launch fixes (stages, entries, padded inputs) or carry
    outlier columns. The members' own GEMV planes are not built."""
    p0 = preps[0]

    def key(p):
        return p["cb1_at"], p["e0"], p["table32"].shape[0], p["kp"], "main_cols" in p

    if any(key(p) != key(p0) for p in preps) or "main_cols" in p0:
        return None
    kl, dev, ns = _lut_kl(p0), p0["table32"].device, [p["n"] for p in preps]
    words = [_lut_words(p, kl) for p in preps]
    i0 = torch.cat([w[0] for w in words], dim=1)
    i1 = torch.cat([w[1] for w in words], dim=1) if _two(p0) else None
    del words
    starts, book = group_chunks(ns, kl, _lut_entries(p0), _sms(dev), lut_threads())
    total = sum(ns)
    return (i0, i1, torch.cat([p["table32"] for p in preps]).contiguous(), p0["e0"], p0["cb1_at"],
            p0["table32"].shape[0], torch.cat([p["scale"].reshape(-1) for p in preps]),
            *_scratch(kl, total, len(book), dev), total, kl, torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor(book, dtype=torch.int32, device=dev), lut_threads(), lut_prmt(_stages(p0)))


_LUT_SET: dict = {}  # set_lut's overrides ("on", "threads", "force", "prmt"); absent or None: environment


@functools.lru_cache(maxsize=1)
def _lut_env() -> tuple[bool, int, Optional[bool]]:
    """(``LLMCOMP_VQ_LUT`` on, ``LLMCOMP_VQ_LUT_THREADS`` or 0, ``LLMCOMP_VQ_LUT_PRMT`` 1 / 0 or unset: None), read
    once: every one-row call consults them."""
    threads = os.environ.get("LLMCOMP_VQ_LUT_THREADS", "0").strip() or "0"
    if threads not in ("0", "512", "1024"):
        raise ValueError(f"LLMCOMP_VQ_LUT_THREADS must be 512 or 1024, not {threads!r}")
    prmt = os.environ.get("LLMCOMP_VQ_LUT_PRMT", "").strip()
    if prmt not in ("", "0", "1"):
        raise ValueError(f"LLMCOMP_VQ_LUT_PRMT must be 0 or 1, not {prmt!r}")
    return not env_off("LLMCOMP_VQ_LUT"), int(threads), None if prmt == "" else prmt == "1"


def lut() -> bool:
    """Whether one row of x takes the lookup-table GEMV (``LLMCOMP_VQ_LUT``, default on, read once; ``set_lut``
    overrides)."""
    on = _LUT_SET.get("on")
    return on if on is not None else _lut_env()[0]


def lut_threads() -> int:
    """Threads a block of the lookup-table GEMV (``LLMCOMP_VQ_LUT_THREADS`` or ``set_lut`` override): by default
    1024 (H200, kernels_h200_vq_lut_next2.json: vq2 28672 × 8192 26.6 µs at 1024 against 29.1 at 512, vq3 36.9
    against 39.2 with the PRMT table; at most 2 % slower on the smaller shapes)."""
    return _LUT_SET.get("threads") or _lut_env()[1] or 1024


LUT_MIN_WEIGHTS = 4096 * 4096  # from there the GEMV is faster than the mma kernel (H200,
# kernels_h200_vq_lut_next2.json: vq2 4096 × 4096 6.67 µs against 6.93, vq3 8.60 against 8.91); below it the mma
# kernel at 1024 and 2048 × 4096 (vq2 5.04 against 5.42 µs at 1024 × 4096), the GEMV from 3072 × 4096
# (kernels_h200_vq_lut_small.json; no Llama weight lies between)


def lut_takes(n: int, k: int) -> bool:
    """Whether an ``n`` × ``k`` weight takes the lookup-table GEMV at one row of x (``lut`` on and weights enough:
    its fixed cost — building the table, the ordered sum of the slices — outweighs its speed on small ones)."""
    return lut() and (n * k >= LUT_MIN_WEIGHTS or bool(_LUT_SET.get("force")))


def lut_prmt(stages: int) -> bool:
    """Whether the GEMV addresses its table by one PRMT a lookup (``csrc/vq_lut.cu``, PRMT): by default with two
    stages only (``LLMCOMP_VQ_LUT_PRMT`` 1 / 0 forces it; ``set_lut`` overrides). H200, 1024 threads,
    kernels_h200_vq_lut_next2.json: vq3 4096 × 4096 8.60 µs against 8.95, 6144 × 4096 10.18 against 10.40, the
    larger shapes within 2 % either way; vq2 4096 × 14336 13.25 against 12.72, 28672 × 4096 15.83 against 15.42."""
    p = _LUT_SET.get("prmt")
    if p is None:
        p = _lut_env()[2]
    return p if p is not None else stages == 2


def set_lut(on: bool | None, threads: int | None = None, force: bool = False, prmt: bool | None = None) -> None:
    """Turn the lookup-table GEMV on or off, its block size and table addressing, for A/B timing in one process
    (None: back to the environment); ``force``: at any number of rows."""
    _LUT_SET.update(on=on, threads=threads, force=force, prmt=prmt)


def lut_gemm_tensors(xm, i0, i1, tab32, e0: int, cb1_at: int, scale, part, counters, n: int, kl: int, rpc: int,
                     threads: int = 1024, prmt: bool = False):
    """The main columns' x [1, K] → y [1, n] by the lookup-table GEMV (i0 / i1: ``lut_planes``)."""
    xm = uniform_cuda.kernel_input(xm.contiguous(), kl)
    return uniform_cuda.extension().vq_lut(xm, i0, i0 if i1 is None else i1, tab32, e0, cb1_at, scale, part,
                                           counters, n, rpc, threads, prmt)


def lut_group_tensors(xm, i0, i1, tab32, e0: int, cb1_at: int, stride: int, scale, part, counters, n: int, kl: int,
                      starts, book, threads: int = 1024, prmt: bool = False):
    """x [1, K] → y [1, n] for the weights stacked in ``lut_group``'s operands: their outputs side by side."""
    xm = uniform_cuda.kernel_input(xm.contiguous(), kl)
    return uniform_cuda.extension().vq_lut_group(xm, i0, i0 if i1 is None else i1, tab32, e0, cb1_at, stride, scale,
                                                 part, counters, n, starts, book, threads, prmt)


@torch.library.custom_op("llmcomp::codebook_lut_group", mutates_args=())
def lut_group_op(xm: torch.Tensor, i0: torch.Tensor, i1: Optional[torch.Tensor], tab32: torch.Tensor, e0: int,
                 cb1_at: int, stride: int, scale: torch.Tensor, part: torch.Tensor, counters: torch.Tensor, n: int,
                 kl: int, starts: torch.Tensor, book: torch.Tensor, threads: int, prmt: bool) -> torch.Tensor:
    """``lut_group_tensors`` as one opaque op (scratch and counters as in ``lut_op``)."""
    return lut_group_tensors(xm, i0, i1, tab32, e0, cb1_at, stride, scale, part, counters, n, kl, starts, book,
                             threads, prmt)


@lut_group_op.register_fake
def _(xm, i0, i1, tab32, e0, cb1_at, stride, scale, part, counters, n, kl, starts, book, threads, prmt):
    return xm.new_empty(1, n)


def _mma_args(prep: dict, dtype: torch.dtype, replicated: bool | None = None) -> tuple:
    """``gemm_tensors``' operands after x for this weight (its mma planes built at the first call)."""
    mma_planes(prep)
    return (prep["qw"], uniform_cuda.high_plane(prep), table(prep, dtype), prep["scale"], prep["n"], prep["cb1_at"],
            prep["kp"], copies(prep, replicated))


def _lut_args(prep: dict) -> tuple:
    lut = lut_planes(prep)
    return (lut["i0"], lut["i1"], prep["table32"], prep["e0"], prep["cb1_at"], lut["scale"], lut["part"],
            lut["counters"], prep["n"], lut["kl"], lut["rows_per_chunk"], lut_threads(), lut_prmt(_stages(prep)))


@torch.library.custom_op("llmcomp::codebook_lut", mutates_args=())
def lut_op(xm: torch.Tensor, i0: torch.Tensor, i1: Optional[torch.Tensor], tab32: torch.Tensor, e0: int, cb1_at: int,
           scale: torch.Tensor, part: torch.Tensor, counters: torch.Tensor, n: int, kl: int, rpc: int,
           threads: int, prmt: bool) -> torch.Tensor:
    """``lut_gemm_tensors`` as one opaque op. ``part`` and ``counters`` are the kernel's scratch: it overwrites the
    partial sums before reading them and leaves the counters zero as it found them, so no input changes as seen
    from outside (not declared mutated: functionalization would copy them every call)."""
    return lut_gemm_tensors(xm, i0, i1, tab32, e0, cb1_at, scale, part, counters, n, kl, rpc, threads, prmt)


@lut_op.register_fake
def _(xm, i0, i1, tab32, e0, cb1_at, scale, part, counters, n, kl, rpc, threads, prmt):
    return xm.new_empty(1, n)


def table(prep: dict, dtype: torch.dtype) -> torch.Tensor:
    t = prep["tables"].get(dtype)
    if t is None:
        t = prep["tables"][dtype] = prep["table32"].to(dtype).contiguous()
    return t


def launch_config(n: int, k: int, m: int, copies: int = 1) -> tuple[int, int]:
    """(warps splitting K, row groups a block): the uniform kernel's rule for its 2-bit shape, never one warp a
    row group (this kernel does not stage x). With one table the H200 sweep of this kernel
    (bench/results/kernels_sweep_h200_vq.log) found that rule within 0–10 % of the best configuration. With the
    table replicated (``copies`` 16, 34 KB a block) a block of 4 warps left too few blocks an SM: at M ≤ 16 the
    block takes 16 warps, the same split of K (clamped as the kernel clamps it) and more row groups (H200 sweep,
    kernels_sweep_h200_vq_copies.json: vq2 14336 × 4096 M=1 15.2 µs at (4, 4) against 30.7 at (4, 1) and 20.0
    with one table; the best of the sweep at every measured shape and M = 1, within 1 % at M = 16)."""
    _, warps, wr = uniform_cuda.launch_config(n, k, 2, m, staged=False, elem=4)  # elem 4: not uniform codes
    if copies > 1 and m <= 16:
        kb = max(1, k // uniform_cuda.kblock(2))
        warps = min(warps, 1 << (kb.bit_length() - 1))  # the kernel's own clamp: a power of two ≤ the kblocks
        wr = max(wr, 16 // warps)
    return warps, wr


@functools.lru_cache(maxsize=1)
def replicate() -> bool:
    """Whether the kernel replicates the table across the 16 shared-memory bank pairs (each lane reads its own
    copy: random indices never collide on a bank); ``LLMCOMP_VQ_REPLICATE=0`` keeps one table, for A/B timing
    in one build. Read once."""
    return not env_off("LLMCOMP_VQ_REPLICATE")


def copies(prep: dict, want: bool | None = None) -> int:
    """Table copies for the kernel: 16 when replicating and the table is small enough (≤ 512 entries), else 1."""
    return 16 if (replicate() if want is None else want) and prep["table32"].shape[0] <= 512 else 1


def gemm(x2: torch.Tensor, prep: dict, launch: tuple | None = None, replicated: bool | None = None) -> torch.Tensor:
    """x2 [M, K] (M ≤ 64) → y [M, N] in x2's dtype, without bias. One row takes the lookup-table GEMV
    (``lut_takes``) unless a launch or table form of the mma kernel is asked for; ``replicated``: default
    ``replicate()``."""
    xm = x2.index_select(1, prep["main_cols"]) if "main_cols" in prep else x2
    if x2.shape[0] == 1 and launch is None and replicated is None and lut_takes(prep["n"], prep["kp"]):
        y = lut_gemm_tensors(xm, *_lut_args(prep))
    else:
        y = gemm_tensors(xm, *_mma_args(prep, x2.dtype, replicated), launch)
    return add_outliers(y, x2, prep)


def gemm_tensors(xm, qw, qh, tab, scale, n: int, cb1_at: int, kp: int, cp: int, launch: tuple | None = None):
    """The main columns' x [M ≤ 64, K] → y [M, n] by the codebook kernel."""
    xm = uniform_cuda.kernel_input(xm.contiguous(), kp)
    warps, wr = launch or launch_config(n, xm.shape[1], xm.shape[0], cp)
    return uniform_cuda.extension().vq_gemm(xm, qw, qh, tab, scale, n, cb1_at, warps, wr, cp)


@torch.library.custom_op("llmcomp::codebook_gemm", mutates_args=())
def gemm_op(xm: torch.Tensor, qw: torch.Tensor, qh: torch.Tensor, tab: torch.Tensor, scale: torch.Tensor, n: int,
            cb1_at: int, kp: int, cp: int) -> torch.Tensor:
    """``gemm_tensors`` as one opaque op (``frozen``): its launch choices run outside dynamo's trace."""
    return gemm_tensors(xm, qw, qh, tab, scale, n, cb1_at, kp, cp)


@gemm_op.register_fake
def _(xm, qw, qh, tab, scale, n, cb1_at, kp, cp):
    return xm.new_empty(xm.shape[0], n)


def prepared(fmt, tensors: dict, in_features: int, cache=None) -> dict:
    """``prepare``'s layouts for these packed tensors, kept in ``cache`` (the calling module's dict)."""
    from llmcomp.kernels import cached

    return cached(cache, ("cuda-vq",), tensors, lambda: prepare(fmt, tensors, in_features))


def linear(x: torch.Tensor, fmt, tensors: dict, in_features: int, bias=None, cache=None) -> torch.Tensor:
    from llmcomp.kernels import rows_linear

    prep = prepared(fmt, tensors, in_features, cache)
    return rows_linear(x, in_features, lambda x2: gemm(x2, prep), bias)


def frozen(fmt, tensors: dict, in_features: int, dtype: torch.dtype, cache=None):
    """``x2 [M ≤ 64, in_features] -> x2 @ W^T`` over this weight's prepared layouts: one ``gemm_op`` call — or
    ``lut_op`` at one row where ``lut_takes`` — plus the outlier columns' product in plain torch, which
    ``torch.compile`` traces without a graph break. Both index layouts are built here, up front."""
    prep = prepared(fmt, tensors, in_features, cache)
    args = _mma_args(prep, dtype)
    # built here: nothing is prepared inside a trace
    one_row = _lut_args(prep) if lut_takes(prep["n"], prep["kp"]) else None
    main, cols = prep.get("main_cols"), prep.get("outlier_cols")
    w_out = prep["outlier_f32"].to(dtype) if cols is not None else None

    def run(x2):
        xm = x2.index_select(1, main) if main is not None else x2
        y = lut_op(xm, *one_row) if one_row is not None and x2.shape[0] == 1 else gemm_op(xm, *args)
        return y if cols is None else y + torch.nn.functional.linear(x2.index_select(1, cols), w_out)

    return run


def fuse(items: list, dtype: torch.dtype):
    """One call for codebook weights that multiply the same x (q / k / v, gate / up), or None: at one row the grouped
    GEMV (``lut_group``: one launch, each weight's chunks with its own codebook), at 2..64 rows each weight's mma
    kernel, outputs side by side. None where the stacked weights would not take the GEMV (``lut_takes``) or cannot
    be stacked (``lut_group``). ``items``: (fmt, tensors, in_features, cache) per weight, in output order."""
    preps = [prepared(*item) for item in items]
    if not lut_takes(sum(p["n"] for p in preps), preps[0]["kp"]):
        return None
    group = lut_group(preps)
    if group is None:
        return None
    each = [_mma_args(p, dtype) for p in preps]  # built here: nothing is prepared inside a trace

    def run(x2):
        if x2.shape[0] == 1:
            return lut_group_op(x2, *group)
        return torch.cat([gemm_op(x2, *a) for a in each], dim=1)

    return run
