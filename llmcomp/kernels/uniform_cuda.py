"""CUDA C++ fast path for the ``uniform`` format (2-, 3- and 4-bit codes) and the E2M1 float formats
(``mxfp4``, ``nvfp4``, ``fp4`` with E2M1 elements): ``csrc/uniform_mma.cuh`` (device code), ``uniform_mma.cu``
(bindings) and ``mma_*.cu`` (the GEMM instantiated per format, compiled in parallel). The same extension holds the
codebook lookup-table GEMV (``vq_lut.cu``, codebook_cuda.py) and the PVQ kernel (``pvq_mma.cu``, pyramid_cuda.py).

The kernel computes ``y^T = W x^T`` on the tensor cores (``mma.sync`` m16n8k16, fp32 accumulate) with
the weights dequantized in registers, for 1–64 rows of ``x``; above that, ``prepare``'s layout is
dequantized by a second kernel and cuBLAS multiplies (prefill is compute-bound). The extension is
compiled with the machine's ``nvcc`` at first use and cached under ``llmcomp``'s cache directory.

``prepare`` builds the kernel's layout once per weight from the canonical tensors: codes regrouped so
that one 16-byte load per lane holds its mma A fragments for a block of ``256/bits`` inputs (the order is
spelled out in uniform_mma.cuh; 3-bit codes: their low 2 bits in the 2-bit layout, their high bit in a plane of
two words a lane), and (scale, -zero·scale) as one 16-bit pair per row and group in the
activation dtype. E2M1 weights share the code layout, each nibble's bits moved within its half-word
(``e2m1_bits``); the kernel's bit move turns a code into ``e2m1(q) · 2^-B``, B = 14 (fp16) or 126 (bf16). Their
block multipliers (MXFP4's E8M0, NVFP4's E4M3; the tensor scale in a factor a row) become one byte a block
(``e2m1_byte_scales``, kernel kind 9); where they cannot (``fp4``'s fp16 scales, rows spanning too many
exponents), one 16-bit ``scale · 2^B`` per row and block in the activation dtype. With power-of-two (MX) scales
the weights are exact; others are within 1 ulp of the reference's single rounding.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from llmcomp.kernels.switches import env_off

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("uniform_mma.cu", "mma_int4.cu", "mma_int2.cu", "mma_int3.cu", "mma_e2m1.cu", "mma_e2m1b.cu", "mma_vq.cu",
           "mma_vq16.cu", "vq_lut.cu", "pvq_mma.cu")  # + HEADERS
HEADERS = ("uniform_mma.cuh", "launch.cuh")
MAX_M = 64
BITS = (2, 3, 4)
E2M1_FORMATS = ("mxfp4", "nvfp4", "fp4")
E2M1_BIAS = {torch.float16: 14, torch.bfloat16: 126}  # the kernel's e2m1 bit move reads as value · 2^-B
# Byte block scales (kernel elem 9; uniform_mma.cuh's Num<T>::E2M1_ADD holds E0): (E0, the exponent bias of dtype, the
# most relative exponents a row's multipliers may span). A byte's scale is 2^(E0 − bias + rel) · (1 + f/8): bf16
# puts e2m1(q) · 2^-126 times it in [2^-32, 22.5]; fp16 keeps e2m1(q) · 2^-14 times it exact (≥ 2^-19) and finite.
E2M1_BYTE = {torch.bfloat16: (222, 127, 31), torch.float16: (11, 15, 19)}


def layout_bits(bits: int) -> int:
    """3-bit codes are bit-sliced: their low 2 bits use the 2-bit layout, their high bit a plane of its own."""
    return 2 if bits == 3 else bits


def kblock(bits: int) -> int:
    return 256 // layout_bits(bits)


def padded_k(in_features: int, bits: int) -> int:
    """Inputs rounded up to whole kblocks: ``prepare`` pads the codes (scale 0) and ``gemm`` x (zeros), so
    e.g. the bundled model's 576 inputs take the 2/3-bit kernel (kblocks of 128)."""
    kb = kblock(bits)
    return -(-in_features // kb) * kb


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension, or None (with one warning saying why) when it cannot be built."""
    if env_off("LLMCOMP_CUDA_KERNELS"):
        return None
    try:
        from torch.utils.cpp_extension import load

        from llmcomp.core.paths import cache_dir

        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            raise RuntimeError(f"compute capability {major}.{minor} < 8.0 (mma.sync bf16 needs Ampere or newer)")
        src = b"".join((CSRC / f).read_bytes() for f in (*SOURCES, *HEADERS))
        tag = hashlib.sha256(src + f"{major}{minor}{torch.__version__}".encode()).hexdigest()[:12]
        build = cache_dir() / "kernels" / f"uniform_mma_{tag}"
        build.mkdir(parents=True, exist_ok=True)
        arch = f"{major}{minor}"
        return load(name=f"llmcomp_uniform_mma_{tag}", sources=[str(CSRC / f) for f in SOURCES],
                    build_directory=str(build),
                    extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"],
                    verbose=os.environ.get("LLMCOMP_VERBOSE_BUILD") == "1")
    except Exception as exc:  # no nvcc, no ninja, old GPU: the Triton or reference path serves instead
        warnings.warn(f"llmcomp: CUDA dequant-GEMM kernel unavailable ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}); "
                      "using the Triton or reference path.", stacklevel=2)
        return None


def is_e2m1(fmt) -> bool:
    from llmcomp.formats.minifloat import E2M1

    return fmt.name in E2M1_FORMATS and fmt.element == E2M1


def _bits_and_group(fmt, in_features: int) -> tuple[int, int]:
    return (4, fmt.block(in_features)) if fmt.name in E2M1_FORMATS else (fmt.bits, fmt.group(in_features))


def shape_ok(fmt, in_features: int, out_features: int) -> bool:
    if fmt.name in E2M1_FORMATS and not is_e2m1(fmt):
        return False
    bits, group = _bits_and_group(fmt, in_features)
    if bits not in BITS or out_features % 16:
        return False
    kb = kblock(bits)
    # the kernel's group index is a multiply-high by ceil(2^32 / group): exact while K · group < 2^32 (K padded)
    fits_index = group >= in_features or padded_k(in_features, bits) * group < 1 << 32
    # A ragged last group (uniform: K not a multiple of the group, e.g. 576 inputs in groups of 128) is group k // G
    # like the others; its inputs past K are padding (x 0). E2M1 blocks must divide K.
    whole = in_features % group == 0 or fmt.name == "uniform"
    return whole and group % (kb // 4) == 0 and fits_index


def supports(fmt, x: torch.Tensor, out_features: int) -> bool:
    return (x.dtype in (torch.float16, torch.bfloat16) and shape_ok(fmt, x.shape[-1], out_features)
            and extension() is not None)


@functools.lru_cache(maxsize=4)
def _tables(bits: int, device: torch.device):
    """Per (lane, word, pair, half): the row within the 16-row tile, the input within the kblock and the
    bit position of that code in the lane's word — the layout contract of uniform_mma.cuh."""
    lane_k, per_half, steps_per_word = kblock(bits) // 4, 8 // bits, 4 // bits
    rows, ks, pos = [], [], []
    for lane in range(32):
        g, c = divmod(lane, 4)
        for wi in range(4):
            for e in range(16 // bits):
                sh, p = 8 * (e // per_half), bits * (e % per_half)
                step, reg = wi * steps_per_word + e // 4, e % 4
                for h in range(2):
                    rows.append(g + 8 * (reg & 1))
                    ks.append(c * lane_k + 4 * step + 2 * (reg >> 1) + h)
                    pos.append(sh + p + 16 * h)
    as_t = functools.partial(torch.tensor, device=device)
    return as_t(rows), as_t(ks), as_t(pos, dtype=torch.int64)


@functools.lru_cache(maxsize=2)
def _high_tables(device: torch.device):
    """3-bit codes' high-bit plane: the cells of ``_tables(2)`` (same order: lane, word wi, pair e, half)
    and the bit of each in the lane's two words: 2e + wi % 2 + 16·half of word wi // 2 (interleaved, so that one
    shift moves the high bits of several pairs of a word to where ``high_magic`` in uniform_mma.cuh wants them)."""
    rows, ks, _ = _tables(2, device)
    wi = torch.arange(4, device=device).view(4, 1, 1)
    e = torch.arange(8, device=device).view(1, 8, 1)
    half = torch.arange(2, device=device).view(1, 1, 2)
    pos = (2 * e + wi % 2 + 16 * half).reshape(-1).repeat(32)
    return rows, ks, pos


def _pack(codes: torch.Tensor, kb: int, tables, words: int, rows_per_chunk: int) -> torch.Tensor:
    """Codes [N, K] → int32 [N/16, K/kb, 32, words]: each (lane, word) ORs the cells ``tables`` list."""
    n, k = codes.shape
    rows, ks, pos = tables
    out = torch.empty(n // 16, k // kb, 32, words, dtype=torch.int32, device=codes.device)
    for start in range(0, n, rows_per_chunk):
        c = codes[start:start + rows_per_chunk]
        nt = c.shape[0] // 16
        tiles = c.reshape(nt, 16, k // kb, kb).permute(0, 2, 1, 3)  # [nt, KB, 16, kb]
        sel = tiles[:, :, rows, ks].to(torch.int64) << pos  # [nt, KB, 32·words·fields]
        w = sel.view(nt, k // kb, 32, words, -1).sum(-1)  # bit fields are disjoint: sum == or
        out[start // 16:start // 16 + nt] = (w - ((w >> 31) << 32)).to(torch.int32)
    return out


def repack(codes: torch.Tensor, bits: int, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Codes [N, K] (integers, 2 or 4 bits) → int32 [N/16, K/kblock, 32, 4] in the kernel's order."""
    return _pack(codes, kblock(bits), _tables(bits, codes.device), 4, rows_per_chunk)


def repack3(codes: torch.Tensor, rows_per_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """3-bit codes → (low 2 bits as ``repack(·, 2)``, high bits int32 [N/16, K/128, 32, 2])."""
    return (repack(codes & 3, 2, rows_per_chunk),
            _pack(codes >> 2, kblock(2), _high_tables(codes.device), 2, rows_per_chunk))


def kernel_input(x2: torch.Tensor, kp: int) -> torch.Tensor:
    """x [M, K] as the mma kernels read it: zero columns up to the layout's ``kp`` inputs (``padded_k``; they meet
    the padded weights) and 16-byte aligned (a copy where it is not)."""
    x2 = F.pad(x2, (0, kp - x2.shape[1])) if kp > x2.shape[1] else x2
    return x2.clone() if x2.data_ptr() % 16 else x2


def _pad_k(codes: torch.Tensor, per_group: list[torch.Tensor], group: int, kp: int):
    """Codes [N, K] → [N, kp] with code 0, and each [N, G] group tensor → [N, ceil(kp / group)] with 0 (one
    group a row stays one: the kernel then reads group 0 everywhere). The padded inputs' x is 0 (``gemm``), so
    their weights add nothing; with scale 0 they are 0 as well where groups were added."""
    k = codes.shape[1]
    if kp == k:
        return codes, per_group
    gp = 1 if group >= k else -(-kp // group)
    return (F.pad(codes, (0, kp - k)),
            [F.pad(t, (0, gp - t.shape[1])) if t.shape[1] < gp else t for t in per_group])


def _e2m1_moves(to_kernel: bool):
    """(source bit, destination bit) per field of a word's 16-bit half: a code's nibble (sign bit 3, exponent bits
    2-1, mantissa bit 0) at 4e → its magnitude at 3e, its sign at 12 + e (``to_kernel``), or back."""
    moves = [(4 * e, 3 * e, 7) for e in range(4)] + [(4 * e + 3, 12 + e, 1) for e in range(4)]
    return moves if to_kernel else [(d, s, m) for s, d, m in moves]


def e2m1_bits(words: torch.Tensor, to_kernel: bool = True) -> torch.Tensor:
    """``repack(codes, 4)``'s int32 words with each half's E2M1 fields moved as ``decode_e2m1`` reads them
    (``to_kernel``; False undoes it): there a word's four pairs come out with 5 shifts where nibbles in place took
    7 — a shift serves one pair's sign and another's magnitude (uniform_mma.cuh)."""
    flat, res = words.reshape(-1), torch.empty(words.numel(), dtype=torch.int32, device=words.device)
    for start in range(0, flat.numel(), 1 << 24):  # int64 temporaries a chunk at a time
        w = flat[start:start + (1 << 24)].to(torch.int64) & 0xFFFFFFFF
        out = torch.zeros_like(w)
        for half in (0, 16):
            for src, dst, mask in _e2m1_moves(to_kernel):
                out |= ((w >> (src + half)) & mask) << (dst + half)
        res[start:start + w.numel()] = (out - ((out >> 31) << 32)).to(torch.int32)
    return res.view(words.shape)


def _prepare_e2m1(codes: torch.Tensor, mult: torch.Tensor, factor: torch.Tensor, group: int, in_features: int) -> dict:
    """E2M1 codes [N, K], their fp32 block multipliers as stored [N, K / group] and each row's fp32 factor [N]
    (``scale_parts``; the block scale S is their product) → ``prepare``'s layout. Blocks whose weights are all 0
    (S = 0, or every code ±0 — MXFP4 gives such blocks the smallest scale, 2^-127) get codes 0 and multiplier 0 in
    ``mult``, so that the byte scales need no zero and no exponent of theirs widens a row's span."""
    kp = padded_k(in_features, 4)
    scale = mult * factor[:, None]
    n, k = codes.shape
    blocks = F.pad(codes, (0, scale.shape[1] * group - k)).reshape(n, -1, group)
    empty = (scale == 0) | ((blocks & 7) == 0).all(-1)  # (E2M1: bit 3 the sign, ±0 the magnitude 0)
    if bool(empty.any()):
        codes = torch.where(empty.repeat_interleave(group, dim=1)[:, :k], torch.zeros_like(codes), codes)
        mult = torch.where(empty, torch.zeros_like(mult), mult)
    codes, (scale, mult) = _pad_k(codes, [scale, mult], group, kp)
    return {"qw": e2m1_bits(repack(codes, 4)), "qh": None, "scale": scale, "mult": mult, "factor": factor, "mz": None,
            "sz": {}, "group": group, "n": codes.shape[0], "bits": 4, "elem": 1, "kp": kp}


def _e2m1_parts(fmt, f: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(block multipliers [N, nb], row factors [N]) of an E2M1 weight's unpacked fields, in float32."""
    mult, factor = fmt.scale_parts(f)
    return mult.float(), factor.float().reshape(-1).expand(mult.shape[0]).contiguous()


def e2m1_byte_scales(mult: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The kernel's byte block scales (elem 9) for ``dtype``: uint8 [N, 4 + G'] (G' = G rounded up to 4), each row
    its fp32 factor's 4 bytes, then one byte a block — bits 3-7 the multiplier's exponent above the row's smallest
    nonzero one, bits 0-2 its fraction (multiplier = 2^e · (1 + f/8)); the factor is the row's ``factor`` times the
    power of two that takes the kernel's scale 2^(E0 − bias + rel) · (1 + f/8) (``E2M1_BYTE``) back to it. None
    where a multiplier is negative or has more than 4 significant bits (``fp4``'s fp16 scales), a row spans more
    exponents than ``dtype`` allows, or a factor leaves fp32's normal range: those weights keep 16-bit scales."""
    e0, bias, span = E2M1_BYTE[dtype]
    if not bool(torch.isfinite(mult).all()) or bool((mult < 0).any()):
        return None
    nz = mult > 0
    mant, ex = torch.frexp(mult)  # mult = mant · 2^ex, mant in [0.5, 1)
    frac = mant * 16 - 8  # 1 + f/8 = 2 · mant
    if not bool(((frac == frac.round()) | ~nz).all()):
        return None
    e = (ex - 1).to(torch.int64)
    big = 1 << 20
    e_min = torch.where(nz, e, big).amin(1)
    e_max = torch.where(nz, e, -big).amax(1)
    e_min = torch.where(e_min == big, torch.zeros_like(e_min), e_min)  # rows of zero blocks
    e_max = torch.maximum(e_max, e_min)
    if bool((e_max - e_min > span).any()):
        return None
    row = factor.double() * torch.pow(2.0, (E2M1_BIAS[dtype] - e0 + bias + e_min).double())
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    if not bool(((row == 0) | ((row.abs() >= tiny) & (row.abs() <= huge))).all()):
        return None
    byte = torch.where(nz, ((e - e_min[:, None]) << 3) | frac.round().to(torch.int64), 0)
    n, g = mult.shape
    out = torch.zeros(n, 4 + -(-g // 4) * 4, dtype=torch.uint8, device=mult.device)
    out[:, :4] = row.float().contiguous().view(torch.uint8).view(n, 4)
    out[:, 4:4 + g] = byte.to(torch.uint8)
    return out


def byte_scales_on() -> bool:
    """On unless ``LLMCOMP_E2M1_BYTE_SCALES=0``: E2M1 weights whose block multipliers allow it (MXFP4, NVFP4) take the
    kernel's byte scales (elem 9), read once per weight and dtype."""
    return not env_off("LLMCOMP_E2M1_BYTE_SCALES")


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    f = fmt.unpack(tensors, in_features)
    if fmt.name in E2M1_FORMATS:
        return _prepare_e2m1(f["codes"], *_e2m1_parts(fmt, f), fmt.block(in_features), in_features)
    group = fmt.group(in_features)
    kp = padded_k(in_features, fmt.bits)
    codes, (scale, zero) = _pad_k(f["codes"], [f["scale"].float(), f["zero"].float()], group, kp)
    qw, qh = repack3(codes) if fmt.bits == 3 else (repack(codes, fmt.bits), None)
    # the fp32 post-scale kernel (M <= 16): integral zeros (RTN, GPTQ), whole kblocks a group
    post = (group % kblock(fmt.bits) == 0 and bool(torch.equal(zero, zero.round()))
            and bool(((zero >= 0) & (zero < 128)).all()))
    return {"qw": qw, "qh": qh, "scale": scale, "mz": -zero * scale, "zero": zero if post else None, "sz": {},
            "group": group, "n": codes.shape[0], "bits": fmt.bits, "elem": 0, "kp": kp}


POST_MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}  # the decode's magic exponent: MAGIC + q is exact


def scale_pairs(prep: dict, dtype: torch.dtype, post: bool = False) -> torch.Tensor:
    """The kernel's scales in ``dtype``: uniform — (scale, mz) per row and group as one int32 of two
    halves (scale in the low half), or with ``post`` (scale, MAGIC + zero) for the fp32 post-scale kernel;
    E2M1 — the byte scales (uint8, ``e2m1_byte_scales``) where they serve, else one int16 ``scale · 2^B`` per row and
    block."""
    sz = prep["sz"].get((dtype, post))
    if sz is None:
        if prep["elem"] == 1 and not post:
            sz = e2m1_byte_scales(prep["mult"], prep["factor"], dtype) if byte_scales_on() else None
            if sz is None:
                sz = (prep["scale"] * 2.0 ** E2M1_BIAS[dtype]).to(dtype).view(torch.int16).contiguous()
        else:
            second = prep["zero"] + POST_MAGIC[dtype] if post else prep["mz"]
            pair = torch.stack([prep["scale"].to(dtype), second.to(dtype)], dim=-1).contiguous()
            sz = pair.view(torch.int32).squeeze(-1).contiguous()
        prep["sz"][(dtype, post)] = sz
    return sz


def scales_fit(prep: dict, dtype: torch.dtype) -> bool:
    """E2M1: true with byte scales; with 16-bit ones whether ``scale · 2^B`` is finite in ``dtype`` (block scales
    below 4; checked once per weight and dtype, a host sync at the first call in that dtype). Larger scales take the
    reference path."""
    if prep["elem"] != 1:
        return True
    fits = prep.setdefault("fits", {})
    if dtype not in fits:
        sz = scale_pairs(prep, dtype)
        fits[dtype] = sz.dtype == torch.uint8 or bool(torch.isfinite(sz.view(dtype)).all())
    return fits[dtype]


def kernel_elem(prep: dict, dtype: torch.dtype) -> int:
    """The element kind the kernels take for ``dtype``: E2M1 with byte scales 9, else ``prep["elem"]``."""
    return 9 if prep["elem"] == 1 and scale_pairs(prep, dtype).dtype == torch.uint8 else prep["elem"]


def launch_config(n: int, k: int, bits: int, m: int, staged: bool | None = None, elem: int = 0,
                  post: bool = True, fp16: bool = False) -> tuple[int, int, int]:
    """(row tiles per warp, warps splitting K, row groups a block); ``launch_override()`` first. M ≤ 8 (H100 sweep,
    bench/results/kernels_sweep_h100.json,
    confirmed by the H200 sweep, kernels_sweep_h200.json): one 16-row tile a warp and 8 warps, 4 when there are
    many row tiles and a short K. M = 9..16 (H200 sweep): one tile a warp too, two (× 4 warps) only for very
    many rows (28672); on the H100 two tiles were ahead on every shape at M = 16 (by ≤ 8 %), so this rule is
    the H200's (on an H100 three picks of its own since: ``is_h100``). The same two tiles × 4 warps for very many
    rows at M ≤ 8 with 4-bit layouts (two tiles share
    each x fragment; H200 sweeps kernels_sweep_h200_r2*.json / .log): W4 28672 × 4096 19.28 µs at M=1 against
    22.03 with one tile × 4 warps, 28672 × 8192 36.46 against 38.28 (one tile × 8 warps); MXFP4 and NVFP4 best
    there too; one tile stayed best on the other shapes, and for the 2-bit layout (W3 28672 × 8192: 49.11 against
    46.04 with the best one-tile configuration; W2 36.16 against 33.21 with this rule's one tile × 4 warps). At
    most two row tiles an SM (4096 rows on an H200): 16 warps split K (the wide instantiation), two tiles a warp at
    M = 9..16 (H200 sweep, kernels_sweep_h200_wide.json: 4096 × 14336 M=1 11.2 µs against 13.6 with 8 warps),
    except 3-bit codes at M ≤ 8 on the per-pair kernel: its one-tile 512-thread kernel needs 78 registers (bf16,
    sm_90), so one block an SM and two waves of blocks on 4096 rows; 8 warps (H200 sweep
    kernels_sweep_h200_w3_s31.json, M=1: 4096² 6.41 µs against 7.43 at 16 warps, 4096 × 14336 15.41 against 17.46;
    bounded to two blocks, 64 registers and no spill, it still lost: 6.82 / 16.71, kernels_sweep_h200_w3_lb_s31.json).
    Above M = 16 (one tile a warp; H200 sweep kernels_sweep_h200_rowgroups.json): many
    rows with a short K take 4 row groups a block of 2 warps each (x read once a block for 4 tiles: 14336 × 4096
    M=32 29.6 µs against 33.7, M=64 56.3 against 64.1), many rows 4 warps, otherwise 4 warps at M > 32
    (4096 × 14336 M=64 46.9 against 58.5) and 8 up to 32. With x staged in shared memory (one warp a row group,
    8 groups a block; H200 sweep kernels_sweep_h200_xstage_m*.json): at least 12 row tiles an SM, or 6 at M > 32
    (28672 × 8192 M=64 146.0 µs against 182.4, M=32 88.8 against 101.2; 14336 × 4096 M=64 51.3 against 56.1).
    Two row tiles a warp above M = 16 too, for uniform 4-bit codes (``elem`` 0) in the three regimes the H200 sweep
    timed (kernels_sweep_h200_r2_m64.log; each x fragment feeds two tiles, so x crosses into the SM half as often):
    very many rows with a long K staged at M > 32 (28672 × 8192 M=64 134.9 µs against 145.5), many rows with a short
    K at 2 warps × 2 row groups (14336 × 4096 M=64 39.7 against 51.5, M=32 27.8 against 31.1), few rows with a long K
    at 8 warps (4096 × 14336 M=64 33.0 against 48.2). A second H200 sweep (kernels_sweep_h200_r2_followup_*.json)
    widened the last to every K above M = 16 (4096 × 4096 M=32 9.6 against 10.3, M=64 13.3 against 16.7; 4096 × 14336
    M=32 23.5 against 25.5) and took the last two to E2M1 elements (MXFP4 M=64: 14336 × 4096 40.2 against 53.0,
    4096 × 14336 33.3 against 48.3); E2M1 with very many rows and a long K at M > 32 take two tiles at 8 warps
    (MXFP4 28672 × 8192 M=64 134.1 against 151.4 staged with one tile, 144.2 staged with two; NVFP4 141.0 against
    152.7). Unchanged: 28672 rows at M ≤ 32 (one tile staged stayed best: 28672 × 4096 47.3 against 50.1 with two)
    and the 2-bit layouts (W3 / W2 at M = 1 on 28672 rows: this rule's pick within 0.3 % / 2.5 % of the sweep's best).
    Between 2 and 6 row tiles an SM, 4 warps at M = 17..32 too, for 4-bit layouts (W4 6144 × 4096 M=32 14.0 against
    18.5 with 8; the 2-bit layouts and the codebook kernel, which takes this rule's split, were not timed there).
    Uniform 4-bit codes at M = 9..16 with many rows take two tiles × 4 warps too since the post-scale kernel serves
    two-tile launches there (H200 sweep kernels_sweep_h200_post16.json: 14336 × 4096 M=16 16.90 µs against 17.47
    with one tile; M=12 16.50 against 16.42). Timed where they run instead — the 8B layer's four decode calls (q/k/v
    stacked, o, gate/up as the GLU call, down) in order under dependent launch, one position's configuration varied
    at a time (bench/chain_sweep.py, H200, kernels_h200_notes.md seventeenth session) — M = 1 kept every pick above
    (39.5 µs a layer), and M = 16 moved two: between 2 and 6 row tiles an SM two tiles × 8 warps (6144 × 4096: the
    chain 59.06 µs against 60.18 with one tile), very many rows with a short K two tiles × 2 warps × 2 row groups
    (28672 × 4096: 59.15 against 60.18 with × 4 warps); both 57.91 against 60.18, for uniform 4-bit codes (the
    post-scale kernel) at M = 9..16. Very many rows with a long K take (2, 2, 2) too: that kernel's 121-124 registers
    (sm_90) give 4 blocks of 4 warps an SM, so (2, 4, 1) ran 1.7 waves of blocks on 28672 rows and (2, 2, 2) runs one
    (H200 sweep onewave_w4{,_fp16}_h200_s40.json, 28672 × 8192: M=12 48.16 µs against 49.88, fp16 47.28 against
    49.95; M=16 50.13 against 51.95, fp16 48.92 against 51.29; the sweeps at M ≤ 16 had not timed 2 warps a row
    group before).
    The 2-bit layouts (W2, W3) at M ≤ 8 through the post-scale kernel: ``_two_bit_post_launch``.
    ``staged`` (default ``x_stage()``): whether the kernel stages x at one warp a row group (the codebook
    kernel does not). ``post``: whether the post-scale kernel can serve the call (``gemm_tensors``: the weight has
    post-scale pairs and M is within ``post_scale()``); the M = 9..16 two-tile rules above are that kernel's.
    ``fp16``: float16 activations (only the 2-bit layouts' rule tells them apart)."""
    forced = launch_override().get((n, k))
    if forced is not None and (forced[0] == 1 or n % 32 == 0):
        return forced
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    sms = props.multi_processor_count
    kbs = k // kblock(bits)
    if m <= 8 and layout_bits(bits) == 2 and elem == 0 and post:
        return _two_bit_post_launch(n, bits, m, kbs, sms, fp16, h100=is_h100(props))
    if 2 <= m <= 8 and bits == 4 and elem == 0 and n % 32 == 0 and 6 * sms <= n // 16 < 12 * sms and is_h100(props):
        return 2, 4, 1  # (H100: two row tiles on many rows from M = 2; see is_h100)
    if 8 < m <= 16 and elem == 9:
        return _e2m1_byte_m16_launch(n, kbs, sms)
    if m <= 16 and n // 16 <= 2 * sms:
        if m <= 8 and bits == 3:  # its 512-thread kernel: one block an SM (see above), so two waves of blocks
            return 1, 8, 1
        return (2 if m > 8 and n % 32 == 0 else 1), 16, 1
    if m <= 16 and elem == 0 and bits in (2, 3) and (m > 8 or (bits == 2 and n // 32 >= 6 * sms)):
        # uniform 2-bit layouts, many rows (H200 sweeps sweep_w2_m1_h200_s32.json, sweep_w3_m16_h200_s32.json;
        # the rule below was 1.2-1.8x slower there): W2 at M <= 8 on very many rows two tiles x 8 warps (28672 x 8192
        # 30.96 us against 36.34 with one tile x 4; W3 keeps one tile there, 47.07 against 50.08); W3 at M = 9..16
        # two tiles, x read once a block of 4 row groups (14336 x 4096 21.67 us against 39.28 with one tile x 4 warps)
        # or, on very many rows, 8 row groups of 2 warps (28672 x 8192 65.75 against 67.64 at two tiles x 4 warps);
        # W2 at M = 9..16 (sweep_w2_m16_h200_s34.json) two tiles x 4 warps x 2 row groups on many rows (14336 x 4096
        # 17.37 us against 32.42 with one tile x 4 warps; (2, 4, 4) 18.11), 8 groups of 2 on very many (28672 x 8192
        # 56.73, the sweep's best)
        if m <= 8:
            return 2, 8, 1
        if n // 32 >= 6 * sms:
            return 2, 2, 8
        return (2, 4, 4) if bits == 3 else (2, 4, 2)
    if m <= 16:  # very many rows: two tiles a warp, at M <= 8 for the 4-bit layouts only (see above)
        very_many = n // 32 >= 6 * sms and (m > 8 or layout_bits(bits) == 4)
        if elem == 1 and m > 8 and n % 32 == 0 and not very_many:
            # E2M1 with 16-bit block scales (elem 1; byte scales: _e2m1_byte_m16_launch) at M = 9..16 after its bit
            # move (H200 sweeps kernels_sweep_{mxfp4,nvfp4}_m16_h200_s35.json): two tiles, x read once a block of 2
            # row groups on many rows (MXFP4 14336 x 4096 17.94 us against 19.27 with one tile x 4 warps), 8 warps
            # otherwise (6144 x 4096 10.39 against 10.52 with one tile)
            return (2, 4, 2) if n // 16 >= 6 * sms else (2, 8, 1)
        post = post and m > 8 and bits == 4 and elem == 0 and n % 32 == 0  # the post-scale kernel's two tiles
        rt = 2 if n % 32 == 0 and (very_many or (post and n // 16 >= 6 * sms)) else 1
        if post and n // 16 < 6 * sms:  # timed in the decode chain (chain_sweep_h200_m16.json)
            return 2, 8, 1
        if post and very_many:  # one wave of blocks at its 121-124 registers (4 blocks of 4 warps an SM)
            return 2, 2, 2
        many = n // (16 * rt) >= 6 * sms
        return rt, 4 if (rt == 2 or (many and kbs <= 64)) else 8, 1
    many = n // 16 >= 6 * sms
    stage = x_stage() if staged is None else staged
    if bits == 4 and n % 32 == 0:  # two row tiles a warp, 4-bit codes or E2M1 elements (see above)
        if stage and n // 16 >= 12 * sms and kbs >= 128 and m > 32:
            return (2, 1, 8) if elem == 0 else (2, 8, 1)
        if many and n // 16 < 12 * sms and kbs <= 64:
            return 2, 2, 2
        if n // 16 <= 2 * sms:
            return 2, 8, 1
    if stage and (n // 16 >= 12 * sms or (many and m > 32)):
        return 1, 1, 8
    if many and kbs <= 64:
        return 1, 2, 4
    return 1, 4 if (many or m > 32 or (bits == 4 and n // 16 > 2 * sms)) else 8, 1


def _e2m1_byte_m16_launch(n: int, kbs: int, sms: int) -> tuple[int, int, int]:
    """Byte-scaled E2M1 (MXFP4, NVFP4: kernel elem 9) at M = 9..16, from H200 sweeps at M = 12 and 16
    (bench/results/sweep_{mxfp4,nvfp4}_m16_h200_s42.json, sweep_{mxfp4,nvfp4}_kind9_h200_s42.json). Its two-tile
    kernels hold 4 more registers than the 16-bit-scale kind's, whose rule (two tiles; the caller's) lost on most
    shapes here: one tile × 8 warps on 4096 rows with a short K (MXFP4 4096² M=16 7.11 µs against 7.40) and on 6144
    rows (8.54 against 9.94), one tile × 4 warps on many rows (14336 × 4096 15.96 against 17.22; 28672 × 4096 29.28
    against 31.82); two tiles stay ahead on 4096 rows with a long K ((2, 16, 1): 4096 × 14336 17.18 against 17.57)
    and on very many rows with a long K ((2, 4, 1): 28672 × 8192 MXFP4 M=12 51.08 against 53.12 with one tile; NVFP4
    there 59.49 against (1, 4, 1)'s 56.51 at M=12, 59.79 against (2, 8, 1)'s 58.33 at M=16 — the rule cannot tell the
    two formats apart). Swept with bf16 activations; fp16 ones take the same rule, untimed."""
    if n // 16 <= 2 * sms:
        return (2, 16, 1) if kbs > 64 and n % 32 == 0 else (1, 8, 1)
    if n // 32 >= 6 * sms and kbs > 64 and n % 32 == 0:
        return 2, 4, 1
    return (1, 4, 1) if n // 16 >= 6 * sms else (1, 8, 1)


def is_h100(props) -> bool:
    """Whether the GPU of ``props`` (``torch.cuda.get_device_properties``) is an H100, where the launch rule (swept
    on the H200 since the second session) takes three picks of its own. The H100 has the H200's 132 SMs and ~2/3 of its
    memory bandwidth (copy 3.0 against 4.2 TB/s measured), so a kernel's fixed costs weigh less against its bytes
    there. One H100 sweep of every launch on the issue's four shapes
    (bench/results/sweep_{w4,w4_m4,w3,w2}_h100_s53.json, bf16, M = 1 / 4 / 16; the rule's other picks were the
    sweep's best or within 1 %) found three, and a second call timed each against the rule's pick in one process
    (rule_*_h100_s53.json): W4 14336 × 4096 two row tiles × 4 warps from M = 2 (13.40 / 13.50 / 13.80 µs at M = 2 /
    4 / 8 against one tile's 13.97 / 14.13 / 14.76; at M = 1 one tile stays ahead, 12.96 against 13.44; M = 9..16
    takes two tiles already); W3 28672 × 8192 two tiles at M = 1 too (39.29 against one tile's 40.57; the H200 had
    one tile ahead there, 37.78 against 39.71; fp16 activations a tie, 40.29 against 40.16); W2 28672 × 8192 with
    bf16 activations two tiles × 4 warps up to M = 6 (30.53 / 31.30 / 32.66 at M = 1 / 2 / 4 against × 8 warps'
    31.77 / 32.50 / 33.42; the H200 had 8 warps ahead, 28.89 against 29.65 at M = 1; M = 5, 6 untimed; from M = 7 2
    warps, as on the H200)."""
    return "H100" in getattr(props, "name", "")


def _two_bit_post_launch(n: int, bits: int, m: int, kbs: int, sms: int, fp16: bool = False,
                         h100: bool = False) -> tuple[int, int, int]:
    """The 2-bit layouts (W2, W3) at M ≤ 8 through the post-scale kernel, from H200 sweeps of its launches at M = 1, 2,
    4, 6, 8 (bench/results/sweep_w{2,3}_m1_h200_s36.json, rule{,2,3}_w{2,3}_h200_s37.json, sweep_w3_m8_h200_s37.json).
    Two row tiles a warp share each x fragment; they win from a few tokens on, and for W3 on few rows with a long K at
    every M: W3 4096 × 14336 (2, 16, 1) 13.49 µs at M=1 against 14.05 with one tile × 8 warps, 14.03 against 15.89 at
    M=8; W3 28672 × 8192 (2, 4, 1) 40.43 at M=4 against 44.25 with one tile, 41.61 against 52.93 at M=8 (one tile still
    ahead at M=1: 37.78 against 39.71); W2 14336 × 4096 (2, 4, 1) 10.78 at M=2 against 11.78; W2 6144 × 4096 (2, 8, 1)
    7.04 at M=4 against 7.13, 7.53 against 7.97 at M=8. One tile where it stayed ahead: W3 on 4096² and 6144 × 4096 at
    every M (5.72 / 7.33 µs at M=1, 6.53 / 8.49 at M=8, the next best 3 and 0.6 % behind at M=8), W3 14336 × 4096 at
    M ≤ 2 (13.26 against 13.71 at M=2). W2 on few rows: at M=2 one tile led on 4096² (5.24 against 5.30) and trailed on
    4096 × 14336 (10.87 against 10.73); at M=4 two led on both (5.51 against 5.54, 10.86 against 11.77). At M = 3, 5, 7
    (rule_m357_w{2,3}_h200_s38.json) the pick was the best or within 0.5 % but at two M = 3 points: W3 14336 × 4096, one
    tile 13.28 against the two picked 13.69, and W2 4096 × 14336, two tiles 10.56 against the one picked 10.81 (W2 4096²
    keeps one: 5.25 against 5.29) — so W2 on few rows with a long K takes two tiles from M = 2, as W3 does at every M,
    and W3 on many rows from M = 4. With float16 activations (sweep_fp16_w{2,3}_h200_s38.json, M = 1 and 8; on 6144
    and 28672 rows sweep_fp16_w{2,3}_b_h200_s39.json) the picks held but on W3 14336 × 4096, where one tile × 4 warps
    took 15.57 µs at M=1 against two tiles' 13.15: its fp16 build held 75 registers, 6 blocks an SM, 792 slots for 896
    blocks — a second wave. Bounded to 72 (``bound7``, on by default) it takes 12.55 µs (13.47 at M=3, two tiles 13.37;
    wave_w3_14336_h200_s39.json), so fp16 follows the bf16 rule. (W3 fp16 28672 × 4096 at M=1: two tiles 21.12 µs
    against one 21.71 bounded; left to the rule, 2.7 %.) W2 on very many rows takes 4 warps since its two-tile 4-warp
    kernel is bounded to 7 blocks an SM (``bound7_r2``) — on a short K, and on a long one with fp16 activations
    (rule_w2_28672{,_fp16}_h200_s39.json, µs at M = 1, 4, 8 against (2, 8, 1): 28672 × 4096 bf16 16.89 / 18.09 /
    20.15 against 17.55 / 18.66 / 20.49, fp16 15.87 / 16.67 / 18.43 against 17.45 / 18.49 / 20.43; 28672 × 8192 fp16
    27.83 / 29.63 / 33.12 against 28.93 / 31.46 / 36.61); with bf16 on a long K 8 warps stayed ahead (28.89 / 31.23 /
    36.74 against 29.65 / 32.21 / 36.49: its bounded bf16 build spills 42 bytes, the fp16 one 14) — but from M = 7,
    where 2 warps (64-thread blocks, one wave at its 79-80 registers) led in two calls (onewave_w2_h200_s40.json,
    w2_m58_h200_s40.json: M=8 35.24 / 35.44 µs against 36.88 / 37.01, M=7 34.40 against 34.77, M=6 34.14 against
    34.23; M=1, 4, 5 8 warps, by 4–10 %; fp16 at M=8 4 warps 33.28 against 34.97). Two late changes, each seen in
    three sweeps (the last, rule_w{2,3}_*_h200_s47.json, timed both launches in one process; the thirty-seventh
    session's, before the 2-bit layouts' swizzle and the lean loop, had found the other way for W2): W2 on many rows
    with a short K takes two row groups a block from M = 2 (14336 × 4096 (2, 4, 2) against (2, 4, 1), bf16 11.08 /
    11.47 / 12.29 µs at M = 2, 4, 8 against 11.56 / 12.00 / 13.07, fp16 10.93 / 11.37 / 12.22 against 11.43 / 11.70 /
    12.44), and W3 on very many rows with a short K two tiles at M = 1 too (28672 × 4096 20.75 µs against 21.38 bf16,
    20.60 against 20.99 fp16)."""
    tiles = n // 16
    if tiles <= 2 * sms:  # few rows (4096): 16 warps split K, 8 for W3 on a short K
        if bits == 3:
            rt, warps = (2, 16) if kbs >= 64 and n % 32 == 0 else (1, 8)
        else:
            rt, warps = (2 if m >= (2 if kbs >= 64 else 4) else 1), 16
    elif tiles < 6 * sms:  # between (6144)
        rt, warps = (2 if bits == 2 and m >= 4 else 1), 8
    elif tiles < 12 * sms:  # many rows (14336)
        rt, warps = (2 if m >= (2 if bits == 2 else 4) else 1), 4
        if bits == 2 and rt == 2 and kbs < 64 and n % 32 == 0:
            return 2, 4, 2  # W2 on a short K: two row groups a block (see above)
    else:  # very many rows (28672); on an H100 W3 two tiles at M = 1 too, W2 4 warps below M = 7 (is_h100)
        if bits == 2:
            rt, warps = 2, (4 if kbs < 64 or fp16 or (h100 and m < 7) else 2 if m >= 7 else 8)
        else:
            rt, warps = (2 if m >= 2 or kbs < 64 or h100 else 1), 4
    return (rt if n % 32 == 0 else 1), warps, 1


@functools.lru_cache(maxsize=1)
def launch_override() -> dict:
    """``LLMCOMP_MMA_LAUNCH``: launch configurations forced by weight shape, for timing a configuration where it runs
    (the compiled decode) rather than alone — ``NxK:rt.warps.wr`` entries joined by ``+`` (e.g.
    ``4096x4096:1.8.1+4096x14336:1.8.1``: the 8B's o and down projections at 8 warps; a stacked call's N is its
    rows together, 6144 for the 8B's q/k/v, 28672 for gate/up), {(n, k): (rt, warps, wr)}, at every M (a two-tile
    entry only where N is a multiple of 32). Read once; a malformed entry is skipped with
    a warning."""
    out = {}
    for entry in filter(None, os.environ.get("LLMCOMP_MMA_LAUNCH", "").replace(" ", "").split("+")):
        try:
            shape, config = entry.split(":")
            n, k = (int(v) for v in shape.lower().split("x"))
            rt, warps, wr = (int(v) for v in config.split("."))
            if rt not in (1, 2) or warps not in (1, 2, 4, 8, 16) or wr not in (1, 2, 4, 8) or warps * wr > 16:
                raise ValueError(entry)
        except ValueError:
            warnings.warn(f"LLMCOMP_MMA_LAUNCH: {entry!r} is not NxK:rt.warps.wr (rt 1 or 2, warps a power of two "
                          "up to 16, row groups up to 8, warps x row groups up to 16); ignored")
            continue
        out[(n, k)] = (rt, warps, wr)
    return out


@torch.library.custom_op("llmcomp::uniform_mma_gemm", mutates_args=())
def gemm_op(x: torch.Tensor, qw: torch.Tensor, qh: torch.Tensor, sz: torch.Tensor, bits: int, group: int, n: int,
            rt: int, warps: int, elem: int = 0, wr: int = 1, glu: int = 0) -> torch.Tensor:
    return extension().gemm(x, qw, qh, sz, bits, group, n, rt, warps, elem, wr, glu)


@gemm_op.register_fake
def _(x, qw, qh, sz, bits, group, n, rt, warps, elem=0, wr=1, glu=0):
    return x.new_empty(x.shape[0], n // 2 if glu else n)


def gemm(x2: torch.Tensor, prep: dict, launch: tuple | None = None) -> torch.Tensor:
    """``launch``: (row tiles a warp, warps splitting K[, row groups a block]), default ``launch_config``."""
    return gemm_tensors(x2, *kernel_tensors(prep, x2.dtype), launch)


def kernel_tensors(prep: dict, dtype: torch.dtype) -> tuple:
    """What the kernels take of ``prep`` for ``dtype`` activations: (qw, high plane, scale pairs, post-scale pairs or
    None, bits, group, n, elem, kp) — ``gemm_tensors``'s and ``linear_op``'s arguments after x. (The post-scale pairs
    are built once per dtype for a weight that has them; ``gemm_tensors`` decides by M whether they are used.)"""
    sz_post = scale_pairs(prep, dtype, post=True) if prep.get("zero") is not None else None
    return (prep["qw"], high_plane(prep), scale_pairs(prep, dtype), sz_post, prep["bits"], prep["group"], prep["n"],
            kernel_elem(prep, dtype), prep["kp"])


def gemm_tensors(x2, qw, qh, sz, sz_post, bits: int, group: int, n: int, elem: int, kp: int,
                 launch: tuple | None = None, glu: int = 0, res=None, gamma=None, sq=None, eps: float = 0.0):
    """x2 [M ≤ 64, K] → y [M, n]: the mma kernel — the fp32 post-scale one when ``sz_post`` is given, at M ≤ 8 and,
    up to ``post_scale()`` rows, at M = 9..16 where the launch takes two row tiles a warp. (H200, W4 g128 bf16,
    bench/results/kernels_h200_post16.json, µs against the per-pair-scale kernel: two row tiles 4096² M=16 7.14 /
    7.43, 4096 × 14336 16.25 / 17.00, 28672 × 8192 56.89 / 59.17, 28672 × 4096 32.78 / 32.88; one tile — where its
    256-thread bf16 build spills — 14336 × 4096 18.35 / 17.44, 6144 × 4096 10.05 / 9.57; its lean build, 72
    registers, at M = 12 / 16 on one-tile launches took 0.94–1.14× the per-pair kernel's time with one row group a
    block ((1, 4, 1), (1, 8, 1)), up to 1.44× with 2–4 row groups a block, and stayed behind the picked two tiles on
    all six shapes at M = 12 and five at M = 16 (28672 × 8192 not reached), e.g. 28672 × 8192 M=12 (1, 2, 2) 56.19
    against (2, 2, 2) 48.12:
    sweep_w4_post16_one_tile_{0,1}_h200_s43.json.) 3-bit codes take it at
    M ≤ 8 only: their two-tile kernel at M = 9..16 spills in its 512-thread build, 0.80–0.88× the per-pair kernel
    (H200, W3 g128 bf16, bench/results/w3_post_ab_alt_h200_s36.json).
    The RMSNorm split around the call (``norm_producer_op`` / ``norm_consumer_op``): with ``res`` and ``gamma`` returns
    [y, res + y, γ ⊙ (res + y), Σ (res + y)² a 16-column tile]; with ``sq`` (and ``eps``) [y scaled by the norm's
    rsqrt a token]."""
    x2 = kernel_input(x2.contiguous(), kp)
    m = x2.shape[0]
    post = sz_post is not None and m <= post_scale() and (m <= 8 or bits != 3)  # (3-bit codes: kind 8, M <= 8)
    rt, warps, *rest = launch or launch_config(n, x2.shape[1], bits, m, elem=elem, post=post,
                                               fp16=x2.dtype == torch.float16)
    wr = rest[0] if rest else 1
    if post and (m <= 8 or (rt == 2 and n % 32 == 0)):
        sz, elem = sz_post, 3
    if res is not None or sq is not None:
        return extension().gemm_norm(x2, qw, qh, sz, bits, group, n, rt, warps, elem, wr, glu, res, gamma, sq, eps)
    return gemm_op(x2, qw, qh, sz, bits, group, n, rt, warps, elem, wr, glu)


@torch.library.custom_op("llmcomp::uniform_linear", mutates_args=())
def linear_op(x2: torch.Tensor, qw: torch.Tensor, qh: torch.Tensor, sz: torch.Tensor, sz_post: Optional[torch.Tensor],
              bits: int, group: int, n: int, elem: int, kp: int) -> torch.Tensor:
    """``gemm_tensors`` as one opaque op (``frozen``): its launch choices (``launch_config``, padding) run outside
    dynamo's trace."""
    return gemm_tensors(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp)


@linear_op.register_fake
def _(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp):
    return x2.new_empty(x2.shape[0], n)


@torch.library.custom_op("llmcomp::uniform_glu", mutates_args=())
def glu_op(x2: torch.Tensor, qw: torch.Tensor, qh: torch.Tensor, sz: torch.Tensor, sz_post: Optional[torch.Tensor],
           bits: int, group: int, n: int, elem: int, kp: int) -> torch.Tensor:
    """``linear_op`` over a gate/up weight interleaved by ``prepare_glu`` with the gated activation in the epilogue:
    x2 [M, K] → silu(x2 @ gateᵀ) · (x2 @ upᵀ) [M, n / 2]."""
    return gemm_tensors(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp, glu=1)


@glu_op.register_fake
def _(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp):
    return x2.new_empty(x2.shape[0], n // 2)


@torch.library.custom_op("llmcomp::uniform_linear_norm_producer", mutates_args=())
def norm_producer_op(x2: torch.Tensor, qw: torch.Tensor, qh: torch.Tensor, sz: torch.Tensor,
                     sz_post: Optional[torch.Tensor], bits: int, group: int, n: int, elem: int, kp: int,
                     res: torch.Tensor, gamma: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``linear_op`` that also does, in its epilogue, the residual add after it and the first half of the RMSNorm
    after that (the post-scale kernel at M ≤ 8 only: weights with its scale pairs): x2 [M ≤ 8, K] → (y [M, n],
    h = res + y in x2's dtype, γ ⊙ h, Σ h² over each 16 columns [M, n / 16] fp32) (res [M, n], γ [n]).
    ``norm_consumer_op`` does the norm's second half (reference: ``norm_reference``)."""
    return tuple(gemm_tensors(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp, res=res.contiguous(),
                              gamma=gamma.contiguous()))


@norm_producer_op.register_fake
def _(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp, res, gamma):
    m = x2.shape[0]
    return x2.new_empty(m, n), x2.new_empty(m, n), x2.new_empty(m, n), x2.new_empty(m, n // 16, dtype=torch.float32)


@torch.library.custom_op("llmcomp::uniform_linear_norm_consumer", mutates_args=())
def norm_consumer_op(x2: torch.Tensor, qw: torch.Tensor, qh: torch.Tensor, sz: torch.Tensor,
                     sz_post: Optional[torch.Tensor], bits: int, group: int, n: int, elem: int, kp: int,
                     sq: torch.Tensor, eps: float, glu: int = 0) -> torch.Tensor:
    """``linear_op`` (``glu``: ``glu_op``) on x2 [M ≤ 8] = γ ⊙ h from ``norm_producer_op``, each token's y scaled by
    rsqrt(Σ sq / K + eps) in the epilogue (K = 16 · sq's columns): W · RMSNorm(h) without a norm kernel."""
    return gemm_tensors(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp, glu=glu, sq=sq.contiguous(), eps=eps)[0]


@norm_consumer_op.register_fake
def _(x2, qw, qh, sz, sz_post, bits, group, n, elem, kp, sq, eps, glu=0):
    return x2.new_empty(x2.shape[0], n // 2 if glu else n)


def norm_reference(y: torch.Tensor, res: torch.Tensor, gamma: torch.Tensor) -> tuple:
    """What ``norm_producer_op`` adds to y [M, n] (in res's dtype): (h, γ ⊙ h, Σ h² a 16-column tile), h = res + y."""
    h = (res.float() + y.float()).to(res.dtype)
    hf = h.float()
    return h, (gamma.float() * hf).to(res.dtype), hf.pow(2).view(h.shape[0], -1, 16).sum(-1)


def _interleave8(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Two tensors of N rows (rows-first, N a multiple of 8, the same shape) → 2N rows: rows 16t..16t+7 are g's
    8t..8t+7, rows 16t+8..16t+15 u's 8t..8t+7."""
    n = g.shape[0]
    if g.shape != u.shape or n % 8:
        raise ValueError(f"interleaving 8 rows at a time needs two tensors of one shape with rows a multiple of 8, "
                         f"got {tuple(g.shape)} and {tuple(u.shape)}")
    return torch.stack([g.reshape(n // 8, 8, *g.shape[1:]), u.reshape(n // 8, 8, *u.shape[1:])], 1) \
        .reshape(2 * n, *g.shape[1:]).contiguous()


def glu_interleave(gate: dict, up: dict) -> dict:
    """Two packed uniform weights of N rows each (every tensor rows-first) → one of 2N rows in which each 16-row
    tile holds 8 gate rows, then the same 8 rows of up: what the GLU epilogue pairs (row r with r + 8 of a tile).
    A tensor that is not N rows (NVFP4's per-tensor scale) is refused: ``prepare_glu`` folds such scales first."""
    n = gate["weight_packed"].shape[0]
    bad = [key for key, g in gate.items() if g.dim() == 0 or g.shape[0] != n]
    if bad:
        raise ValueError(f"glu_interleave: {', '.join(bad)} not rows-first with {n} rows; use prepare_glu")
    return {key: _interleave8(g, up[key]) for key, g in gate.items()}


def prepare_glu(fmt, gate: dict, up: dict, in_features: int) -> dict:
    """``prepare``'s layout for the GLU call: gate's and up's N rows each interleaved 8 and 8 a 16-row tile
    (``glu_interleave``). Uniform: the packed tensors interleaved, then prepared. E2M1 (mxfp4, nvfp4, fp4): each
    member's codes and fp32 block multipliers as ``prepare`` computes them (NVFP4: E4M3 block scale × that member's
    own tensor scale, in fp32), interleaved, then laid out: every row's multipliers are the bits its member's own
    ``prepare`` holds, whatever the two tensor scales. (The prepared codes cannot be interleaved after the fact: a
    lane's word holds rows r and r + 8 of a tile.)"""
    if fmt.name not in E2M1_FORMATS:
        return prepare(fmt, glu_interleave(gate, up), in_features)
    fg, fu = fmt.unpack(gate, in_features), fmt.unpack(up, in_features)
    (mg, rg), (mu, ru) = _e2m1_parts(fmt, fg), _e2m1_parts(fmt, fu)
    return _prepare_e2m1(_interleave8(fg["codes"], fu["codes"]), _interleave8(mg, mu), _interleave8(rg, ru),
                         fmt.block(in_features), in_features)


@functools.lru_cache(maxsize=1)
def x_stage() -> bool:
    """``LLMCOMP_MMA_XSTAGE=0`` (``env_off``) turns off staging x in shared memory (above M = 16 with one warp a row
    group); launch_config then never picks one warp a row group, which is slow unstaged. Read once, as the extension
    does."""
    return not env_off("LLMCOMP_MMA_XSTAGE")


POST_SCALE_ROWS = 16  # the most rows of x the post-scale kernel takes (one or two token tiles a warp)
_post_rows: list = []  # [rows] once read from the environment or set


def post_scale() -> int:
    """Up to how many rows of x (M) the fp32 post-scale kernel serves weights with integral zeros (3-bit codes: at
    most 8, ``gemm_tensors``); 0: never. ``LLMCOMP_MMA_POST_SCALE`` = ``0`` (off), ``8``, ``16``, or ``1`` / unset
    (the default, ``POST_SCALE_ROWS``), for A/B timing in one build: on the H200 it was 3–5 % faster for W4 and
    3–8 % for W2 at M = 1 (bench/results/kernels_h200_postscale.json against kernels_h200_postscale_off.json)."""
    if not _post_rows:
        env = "LLMCOMP_MMA_POST_SCALE"
        _post_rows.append(_post_rows_of(os.environ.get(env, "1").strip(), env))
    return _post_rows[0]


def _post_rows_of(value, what: str = "post-scale rows") -> int:
    if value in (True, "1", ""):
        return POST_SCALE_ROWS
    if value in (False, None, "0"):
        return 0
    if str(value) not in ("8", "16"):
        raise ValueError(f"{what} must be 0, 8 or 16 (1: the default, {POST_SCALE_ROWS}), not {value!r}")
    return int(value)


def set_post_scale(on) -> int:
    """Switch the post-scale kernel on (``True``: up to ``POST_SCALE_ROWS`` rows of x, or ``8`` / ``16``) or off
    for A/B timing in one process (a captured CUDA graph keeps the kernels it was captured with)."""
    _post_rows[:] = [_post_rows_of(on)]
    return _post_rows[0]


def dependent_launch() -> Optional[bool]:
    """Whether the GEMMs launch with programmatic dependent launch (sm_90+, opt-in: ``LLMCOMP_PDL=1``): a kernel
    may start while the previous one in the stream finishes, loading its first weights before it waits for that
    kernel's results (``grid_dep_wait`` in csrc/launch.cuh). Off by default: on an H200 it made a chain of
    our own GEMMs 9 % faster but the compiled 8B decode step 2 % slower (bench/results/kernels_h200_pdl.json,
    decode_h200_ab_pdl.json). None without the extension."""
    return _ext_switch("pdl")


def set_dependent_launch(on: bool) -> Optional[bool]:
    """Turn dependent launch on or off for this process (A/B timing); returns the new state (None without the
    extension). Graphs captured before keep the launches they were captured with."""
    return _ext_switch("set_pdl", on)


def lean() -> Optional[bool]:
    """Whether the post-scale kernels (M ≤ 16: the batch-1 and batch-16 decode's) run their lean instantiations: the
    weights through one pointer a row tile advanced a round, x's and the scales' row pointers kept in registers, the
    group index without the lane's offset — the steady loop in the sm_90 SASS 289 instructions a round instead of 348
    for the batch-1 gate/up call's kernel (70 → 64 registers), 301 instead of 346 for one row tile, 616 instead of 651
    for two tiles at M = 9..16 (``bench/sass_local.sh``). On unless ``LLMCOMP_MMA_LEAN=0``; the same bits
    (``test_lean_kernel_gives_the_same_bits``, passed on an H200). In the compiled 8B W4 decode at batch 1 on an H200
    (twenty-fifth session, two calls, runs interleaved): 1.753 / 1.756 ms a step against 1.779 / 1.770 without (the
    gate/up call 21.3 µs against 22.0). Reduced forms of it (the row pointers alone, or weight pointers on one-tile
    kernels only) were slower there in four draws of the twenty-fourth session, and lean only where a warp has more
    than one round no faster (bench/results/kernels_h200_notes.md). None without the extension."""
    return _ext_switch("lean")


def set_lean(on: bool) -> Optional[bool]:
    """Switch ``lean`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_lean", on)


def scale_early() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_SCALE_EARLY=0``: the lean batch-1 post-scale kernels with 4-bit codes (every linear
    of a decode step at M ≤ 8 where each pair of kblocks is in one group: groups a multiple of 128 inputs with an
    even number of kblocks a warp, or one group a row) load a round's scale words together with its weights (one
    word a pair of kblocks, row half and tile), instead of each tile's just before its math. In their sm_90 SASS the
    second tile's scales (other rows: an L2 trip) were loaded only after the first tile's mma, and the second
    kblock's after the first kblock's math (twenty-eighth session). The compiled 8B W4 decode on an H200: 1.586 ms
    a step against 1.731 without, the same build (twenty-ninth session; bench/results/kernels_h200_notes.md). The
    same bits (``test_scale_early_gives_the_same_bits``). None without the extension."""
    return _ext_switch("scale_early")


def set_scale_early(on: bool) -> Optional[bool]:
    """Switch ``scale_early`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_scale_early", on)


def scale_early16() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_SCALE_EARLY16=0``: ``scale_early``'s loads in the M = 9..16 post-scale kernels too (two
    token tiles; the batch-16 decode), under the same launch condition. The compiled 8B W4 decode at batch 16 on an
    H200: 2.68 ms a step against 2.80 without, the same build; W4 M = 16 with it 6.41 / 15.37 / 15.04 / 50.69 µs on
    the kernel table's shapes (thirtieth session; bench/results/kernels_h200_notes.md). The same bits
    (``test_scale_early_gives_the_same_bits``). None without the extension."""
    return _ext_switch("scale_early16")


def set_scale_early16(on: bool) -> Optional[bool]:
    """Switch ``scale_early16`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_scale_early16", on)


def scale_pair() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_SCALE_PAIR=0`` (the default since the forty-seventh session; the whole CUDA test file
    passed with it on, bench/results/kernels_cuda_tests_pair_on_h200_s47.log): the early-scale kernels (``scale_early``
    at M ≤ 8, with or without the norm split's epilogue; ``scale_early16`` at M = 9..16) sum each pair of kblocks —
    one group, as their launch condition makes every pair — in fp32 before scaling it into the accumulators: half the
    scale fmas (the M = 16 loop 590 → 555 instructions a round, sm_90). Not the fp16 two-tile × 4-warp kernels at
    M ≤ 8 that ``bound7_r2`` bounds. H200, bf16, ``bench/kernel_ab.py --knob pair``
    (bench/results/kernels_ab_pair_h200_s46.json): 28672 × 8192 M=16 50.10 → 49.05 µs, from 1.1 % slower (4096 × 4096 M=1) to 2.1 % faster over six shapes at M = 1..16; the
    compiled 8B W4 decode 1.6055 → 1.6014 ms at batch 1, 2.682 → 2.649 at 16. Not the same bits: s · (t0 + t1)
    against s · t0 + s · t1 (``test_scale_pair_matches_the_unpaired_kernel``). None without the extension."""
    return _ext_switch("scale_pair")


def set_scale_pair(on: bool) -> Optional[bool]:
    """Switch ``scale_pair`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_scale_pair", on)


def w3_lean() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_W3_LEAN=0``: with ``lean`` on, the plain 3-bit post-scale kernels (kind 8, M ≤ 8; not
    the norm epilogues', not the 512-thread builds) run the lean loop as the 4-bit ones do — the weights and the
    high-bit plane through one pointer each a row tile, advanced a round; x's and the scales' row pointers in
    registers; at 128 threads bounded to 72 registers (``bound7``). H200, bf16, ``bench/kernel_ab.py --knob w3lean
    --bits 3`` (bench/results/kernels_ab_w3lean_h200_s45.json): 28672 × 8192 M=4 40.54 → 38.60 µs, 14336 × 4096
    M=1 12.49 → 12.03; from 1.4 % slower (4096 × 4096 M=1) to 5 % faster over six shapes at M = 1, 4, 8. The same
    bits (``test_w3_lean_gives_the_same_bits``). None without the extension."""
    return _ext_switch("w3_lean")


def set_w3_lean(on: bool) -> Optional[bool]:
    """Switch ``w3_lean`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_w3_lean", on)


def e2m1_lean() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_E2M1_LEAN=0``: the E2M1 kernels (mxfp4, nvfp4, fp4) at M ≤ 8 with 256-thread blocks
    (not the 512-thread ones: warps × row groups = 16) run the lean loop the post-scale kernels run (``lean``: the
    weights through one pointer a row tile advanced a round, x's and the scales' row pointers in registers). H200,
    MXFP4 bf16 at M = 1 (thirtieth session, ``bench/kernel_ab.py --knob e2m1``, the last call): 28672 × 8192 45.6 →
    42.2 µs, 28672 × 4096 24.5 → 22.2, 14336 × 4096 13.9 → 13.4, 6144 × 4096 8.2 → 7.5. In an earlier call the
    512-thread kernels were slower lean (4096² 6.1 → 6.7) and keep the plain loop, and block scales loaded with the
    weights on top were slower than lean alone (28672 × 8192 43.1 against 41.6 µs). The same bits
    (``test_e2m1_lean_gives_the_same_bits``). None without the extension."""
    return _ext_switch("e2m1_lean")


def set_e2m1_lean(on: bool) -> Optional[bool]:
    """Switch ``e2m1_lean`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_e2m1_lean", on)


def dequant_stage() -> Optional[bool]:
    """On unless ``LLMCOMP_DEQUANT_STAGE=0``: the dequantize kernel (prefill: dequantize, then cuBLAS) passes each
    warp's 16 rows through shared memory so that its stores write whole 128-byte lines; unstaged, each lane writes its
    own inputs of two rows and a store instruction covers half of each 32-byte sector it touches. The same bits
    (``test_dequant_stage_gives_the_same_bits``). None without the extension."""
    return _ext_switch("dequant_stage")


def set_dequant_stage(on: bool) -> Optional[bool]:
    """Switch ``dequant_stage`` for this process (A/B timing)."""
    return _ext_switch("set_dequant_stage", on)


def bound7() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_BOUND7=0``: the 3-bit post-scale kernel at one row tile × 4 warps (128 threads) runs an
    instantiation bounded to 7 blocks an SM (72 registers) in fp16 and in the norm split's epilogues. Unbounded, its
    fp16 build holds 75 registers and its norm-epilogue bf16 build 73 (sm_90 ptxas), which leaves 6 blocks an SM —
    on 14336 rows 792 slots for 896 blocks, a second wave. H200, W3 14336 × 4096 (``bench/wave_check.py``,
    bench/results/wave_w3_14336_h200_s39.json): M=1 fp16 15.76 → 12.55 µs, the bf16 producer 15.93 → 13.43, the
    bf16 GLU consumer 15.74 → 13.45; M=3 fp16 18.44 → 13.47; the fp16 epilogues (67 registers, 7 blocks already)
    13.14 → 12.97 and 13.26 → 13.05; on 28672 × 4096 from 0.1 % slower to 2.6 % faster. The bf16 plain kernel (72
    registers) stays unbounded: bounded it spilled 8 bytes and lost (12.43 → 12.97 µs, 28672 rows 21.37 → 22.46).
    Under ``w3_lean`` the bf16 plain kernel's lean build (75 registers unbounded) is bounded too, 72 with no spill.
    The same bits (``test_register_bound_gives_the_same_bits``). None without the extension."""
    return _ext_switch("bound7")


def set_bound7(on: bool) -> Optional[bool]:
    """Switch ``bound7`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_bound7", on)


def bound7_r2() -> Optional[bool]:
    """On unless ``LLMCOMP_MMA_BOUND7_R2=0``: the lean two-tile post-scale kernels (M ≤ 8) at 4 warps run
    instantiations bounded to 7 blocks an SM (72 registers) where their builds hold more — 4-bit codes in fp16 (73–74
    registers, sm_90 ptxas), 2-bit codes (76–80; bounded they spill 10–54 bytes): 6 blocks an SM, on 28672 rows 792
    slots for 896 blocks. H200 (``bench/wave_check.py``, bench/results/wave_w{4,2}_h200_s39.json), M=1 at (2, 4, 1),
    µs unbounded → bounded: W4 fp16 28672 × 8192 42.67 → 31.38 (the norm producer 44.27 → 32.12, the GLU consumer
    44.08 → 32.02), 28672 × 4096 23.13 → 17.13, at M=8 25.14 → 17.89; W2 28672 × 8192 bf16 32.46 → 29.71, fp16
    32.93 → 28.14, 28672 × 4096 bf16 18.41 → 16.96, fp16 18.23 → 15.76 (the epilogues alike). The bf16 4-bit builds
    hold 69–72 and stay unbounded. The same bits (``test_register_bound_gives_the_same_bits``). None without the
    extension."""
    return _ext_switch("bound7_r2")


def set_bound7_r2(on: bool) -> Optional[bool]:
    """Switch ``bound7_r2`` for this process (A/B timing); graphs captured before keep their kernels."""
    return _ext_switch("set_bound7_r2", on)


def _ext_switch(name: str, *args) -> Optional[bool]:
    """The extension's switch ``name`` (a getter, or a setter given its value) as a bool; None without it."""
    ext = extension() if torch.cuda.is_available() else None
    return bool(getattr(ext, name)(*args)) if ext is not None else None


def high_plane(prep: dict) -> torch.Tensor:
    """The second code plane the kernels take (3-bit codes' high bits, VQ's second stage); any tensor otherwise."""
    return prep["qh"] if prep["qh"] is not None else prep["qw"]


def dequantize(prep: dict, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W [N, in_features] in ``dtype`` (a view without the padded inputs' columns where there are some)."""
    w = extension().dequant(prep["qw"], high_plane(prep), scale_pairs(prep, dtype), prep["bits"], prep["group"],
                            prep["n"], prep["kp"], dtype, kernel_elem(prep, dtype))
    return w[:, :in_features] if prep["kp"] > in_features else w


def prepared(fmt, tensors: dict, in_features: int, cache=None) -> dict:
    """``prepare``'s layout for these packed tensors, kept in ``cache`` (the calling module's dict)."""
    from llmcomp.kernels import cached

    return cached(cache, ("cuda",), tensors, lambda: prepare(fmt, tensors, in_features))


def linear(x: torch.Tensor, fmt, tensors: dict, in_features: int, bias=None, cache=None) -> torch.Tensor:
    prep = prepared(fmt, tensors, in_features, cache)
    if not scales_fit(prep, x.dtype):  # the reference product, its weight dequantized once per dtype
        ref = prep.setdefault("reference", {})
        if x.dtype not in ref:
            ref[x.dtype] = fmt.dequantize(tensors, in_features, dtype=x.dtype)
        return F.linear(x, ref[x.dtype], bias)
    x2 = x.reshape(-1, in_features).contiguous()
    if x2.shape[0] <= MAX_M:
        y = gemm(x2, prep)
        if bias is not None:
            y = y + bias.to(y.dtype)
    else:
        y = F.linear(x2, dequantize(prep, in_features, x.dtype), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class FrozenCall:
    """``x2 -> linear_op(x2, *args)`` over fixed kernel tensors (``args``: ``kernel_tensors``' tuple), as ``frozen``
    and ``fuse`` return it; dynamo inlines the call."""

    def __init__(self, args: tuple):
        self.args = args

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return linear_op(x2, *self.args)


def frozen(fmt, tensors: dict, in_features: int, dtype: torch.dtype, cache=None):
    """``x2 [M ≤ MAX_M, in_features] -> x2 @ W^T`` over this weight's prepared layout, as one ``linear_op`` call that
    ``torch.compile`` traces without a graph break (no Python dispatch, no cache lookups); None where the kernel
    cannot take the weight in ``dtype`` (E2M1 scales too large for it)."""
    prep = prepared(fmt, tensors, in_features, cache)
    if not scales_fit(prep, dtype):
        return None
    return FrozenCall(kernel_tensors(prep, dtype))


class GluCall(FrozenCall):
    """``x2 -> glu_op(x2, *args)``: the gated MLP's gate and up projections and their activation as one call; more
    than ``MAX_M`` rows (prefill) through the interleaved weight dequantized (``dequantize``) and cuBLAS, so the
    members never need layouts of their own."""

    def __init__(self, args: tuple, prep: dict, in_features: int):
        super().__init__(args)
        self.prep, self.in_features = prep, in_features

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= MAX_M:
            return glu_op(x2, *self.args)
        return self.dense(x2)

    @torch.compiler.disable
    def dense(self, x2: torch.Tensor) -> torch.Tensor:
        y = F.linear(x2, dequantize(self.prep, self.in_features, x2.dtype))  # [M, 2N]: 8 gate, 8 up columns a tile
        pairs = y.view(x2.shape[0], -1, 2, 8)
        return (F.silu(pairs[:, :, 0]) * pairs[:, :, 1]).reshape(x2.shape[0], -1)


def glu_format(fmt) -> bool:
    """Whether the GLU call takes this format's weights at all: uniform codes or E2M1 elements (mxfp4, nvfp4, fp4)."""
    return fmt.name == "uniform" or is_e2m1(fmt)


def glu(fmt, gate: dict, up: dict, in_features: int, dtype: torch.dtype) -> Optional[GluCall]:
    """One ``glu_op`` call for a gated MLP's gate and up weights (uniform or E2M1 elements — mxfp4, nvfp4, fp4 —,
    N rows each, N a multiple of 8), their rows interleaved and prepared anew (``prepare_glu``); None where the kernel
    cannot take them in ``dtype`` (E2M1 block scales too large for it included)."""
    if not glu_format(fmt):
        return None
    n = gate["weight_packed"].shape[0]
    if n % 8 or not shape_ok(fmt, in_features, 2 * n):
        return None
    prep = prepare_glu(fmt, gate, up, in_features)
    if not scales_fit(prep, dtype):
        return None
    return GluCall(kernel_tensors(prep, dtype), prep, in_features)


def fuse(items: list, dtype: torch.dtype):
    """One ``linear_op`` call for several weights that multiply the same input (q/k/v, gate/up): their prepared
    layouts stacked along the output rows (the layout is row-tile major, so stacking is concatenation), or None
    where they differ in anything the kernel fixes per call (bits, group, element kind, padded K, post-scale pairs)
    or a member cannot run in ``dtype``. ``items``: (fmt, tensors, in_features, cache) per weight, in output order.
    Each member's prepared tensors for ``dtype`` become views of the stacked ones (no second copy of the weights).
    The stacked call's output columns are the members' outputs in order."""
    preps = [prepared(*item) for item in items]
    if not all(scales_fit(p, dtype) for p in preps):
        return None
    args = [kernel_tensors(p, dtype) for p in preps]
    if len({(a[4], a[5], a[7], a[8], a[3] is None) for a in args}) != 1:
        return None
    qw = torch.cat([a[0] for a in args])
    three = preps[0]["qh"] is not None
    qh = torch.cat([a[1] for a in args]) if three else qw
    sz = torch.cat([a[2] for a in args])
    sz_post = torch.cat([a[3] for a in args]) if args[0][3] is not None else None
    row = 0
    for p in preps:
        n = p["n"]
        tiles = slice(row // 16, (row + n) // 16)
        p["qw"] = qw[tiles]
        if three:
            p["qh"] = qh[tiles]
        p["sz"][(dtype, False)] = sz[row:row + n]
        if sz_post is not None:
            p["sz"][(dtype, True)] = sz_post[row:row + n]
        row += n
    return FrozenCall((qw, qh, sz, sz_post, args[0][4], args[0][5], row, args[0][7], args[0][8]))
