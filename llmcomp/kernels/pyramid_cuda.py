"""CUDA fast path for the ``pyramid`` format (PVQ): ``csrc/pvq_mma.cu``, 1–32 rows of x on the tensor cores,
dequantize + cuBLAS above.

The stored enumeration index decodes by a sequential big-integer walk down each group — far too slow inside a
GEMM — so the first call decodes it once (``prepare``, on the weight's device) into a layout the kernel multiplies
directly:

- ``qw``: the pulses y clamped to [-8, 7] as 4-bit codes y + 8, in the mma's A-fragment order (``layout``; inputs
  padded to chunks of 64 with code 8, i.e. 0);
- ``s``: the group scales gain / ‖y‖ (float32 [out / dim, padded inputs], computed as ``Pyramid.dequantize`` does);
- escapes: the pulses outside [-8, 7] (measured on the bundled model: none to 2e-4 of them at 2 bits a weight,
  up to 3e-3 at 3 bits), their remainder y − clamp(y) times the scale, listed by row group and chunk.

GPU memory is then the packed tensors (2–3 bits a weight) plus 4 + 32 / dim bits a weight for the layout — the
layout alone about 28 % of what the reference path's cached bf16 weight takes. The kernel folds the scale into x (it
varies along the inputs but not across a group's rows): a 16-row tile's product is codes · (x ⊙ s), x ⊙ s rounded
once to x's dtype. Groups must be whole 16-row tiles (``dim`` a multiple of 16); other shapes take the reference.
With ``rotate``, x is rotated (x · R, float32, then x's dtype) instead of the weight unrotated.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from llmcomp.formats import hadamard
from llmcomp.kernels import uniform_cuda

MAX_M = 32  # the kernel's rows of x (up to 4 n-tiles of the mma's n = 8); more: dequantize + cuBLAS
# Each escape costs the kernel M shared atomics and loads of x: weights with more escapes than this share of their
# pulses ("dense") take the kernel up to 16 rows of x, in row groups of at most 2 tiles above 8 rows (fewer escapes a
# warp and chunk), and dequantize + cuBLAS above. H200, pvq3 (3.7e-3 escapes), sweep_pvq3_final_h200_s34.json: M=16
# 4096 x 4096 27.2 µs, 14336 x 4096 79.6 (with 4 tiles a group 144.3), 4096 x 14336 67.7, against the dequantize
# path's 35.5 / 105.1 / 111.0; M=32 (sweep_pvq3_pairs_h200_s34.json) 90.7 / 185.1 / 249.8 against 35.8 / 103.9 / 111.8.
# pvq2 (1.9e-5) at M=32 beats the dequantize path (21.6 µs against 33.8 on 4096 x 4096, sweep_pvq2_pairs_h200_s34.json).
DENSE_ESCAPES = 1e-3
DENSE_MAX_M = 16
CHUNK = 64  # inputs a lane's 16-byte load of one tile covers
LOW, HIGH = -8, 7  # pulses held in the 4-bit codes; the rest are escapes


def shape_ok(fmt, in_features: int, out_features: int) -> bool:
    return fmt.dim % 16 == 0 and out_features % fmt.dim == 0 and in_features >= 1


def supports(fmt, x: torch.Tensor, out_features: int, in_features: int) -> bool:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    return (x.dtype in (torch.float16, torch.bfloat16) and rows >= 1 and shape_ok(fmt, in_features, out_features)
            and uniform_cuda.extension() is not None)


def tile_options(dim: int) -> tuple[int, ...]:
    """16-row tiles a row group (one block's rows) that keep a row group inside one PVQ group (one scale row)."""
    return tuple(r for r in (1, 2, 4) if dim % (16 * r) == 0)


def n_tiles(m: int) -> int:
    """n-tiles of 8 rows of x the kernel takes for ``m`` rows: the fewest, a power of two (csrc/pvq_mma.cu)."""
    return 1 if m <= 8 else 2 if m <= 16 else 4


def valid_launch(r: int, warps: int, nt: int) -> bool:
    """(tiles a row group, warps, n-tiles) the extension is built for (csrc/pvq_mma.cu ``valid_launch``): the warps'
    shared tiles within 48 KB, at most 8 accumulator fragments a lane, 8 or 16 warps above one n-tile."""
    return (r in (1, 2, 4) and warps in (4, 8, 16) and nt in (1, 2, 4) and warps * r * nt * 16 * 8 * 4 <= 48 * 1024
            and r * nt <= 8 and (nt == 1 or warps >= 8))


def launches(dim: int, m: int, chunks: int) -> list[tuple[int, int, int]]:
    """Every (tiles, warps, splits) the kernel takes for ``m`` rows of x (the launch sweep's set)."""
    return [(r, w, sp) for r in tile_options(dim) for w in (4, 8, 16) for sp in (1, 2, 4, 8)
            if valid_launch(r, w, n_tiles(m)) and sp * w <= chunks]


def layout(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, Kp] (N % 16 == 0, Kp % 64 == 0) → int32 [N / 16, Kp / 64, 32, 4]: tile, chunk, lane (g, c),
    kblock; nibble e·4 + h2·2 + h of a word is row g + 8h, input 16·kblock + 8·h2 + 2c + e (csrc/pvq_mma.cu)."""
    n, kp = codes.shape
    t = codes.to(torch.int32).reshape(n // 16, 2, 8, kp // CHUNK, 4, 2, 4, 2)  # tile h g chunk kb h2 c e
    t = t.permute(0, 3, 2, 6, 4, 7, 5, 1).reshape(n // 16, kp // CHUNK, 32, 4, 8)  # tile chunk g c kb | e h2 h
    words = (t.to(torch.int64) << torch.arange(0, 32, 4, device=codes.device)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the same 32 bits


def codes_of(qw: torch.Tensor) -> torch.Tensor:
    """``layout``'s inverse: int32 [N / 16, chunks, 32, 4] → codes [N, 64 · chunks] (tests, pure-torch reference)."""
    tl, ch = qw.shape[:2]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qw.device)
    t = (qw.unsqueeze(-1) >> shifts) & 0xF  # tile chunk g·4+c kb nib
    t = t.reshape(tl, ch, 8, 4, 4, 2, 2, 2)  # tile chunk g c kb e h2 h
    return t.permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(tl * 16, ch * CHUNK)


PREPARE_WEIGHTS = 1 << 24  # weights decoded at a time by ``prepare`` (its temporaries: ~50 bytes a weight)


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    """The kernel's operands for one weight, from its packed tensors (on their device), decoded a slice of whole
    groups' rows at a time so that a large weight's temporaries stay bounded."""
    k = in_features
    chunks = -(-k // CHUNK)
    kp = chunks * CHUNK
    blocks = tensors["weight_index"].shape[0]
    step = max(1, PREPARE_WEIGHTS // (fmt.dim * k))
    qw, s, esc = [], [], ([], [], [], [])
    for b0 in range(0, blocks, step):
        part = {name: t[b0:b0 + step] if name != "norm_levels" else t for name, t in tensors.items()}
        pulses, scale = fmt.points_and_scales(part, k)
        y = pulses.to(torch.int32)
        yc = y.clamp(LOW, HIGH)
        row, col = (y != yc).nonzero(as_tuple=True)
        s_at = scale[row // fmt.dim, col]
        qw.append(layout(F.pad(yc + 8, (0, kp - k), value=8)))
        s.append(F.pad(scale.float(), (0, kp - k)))
        for out, v in zip(esc, (row + b0 * fmt.dim, col, (y - yc)[row, col].float() * s_at,
                                y[row, col].float() * s_at)):
            out.append(v)
    row, col, rest, full = (torch.cat(v) for v in esc)
    n = blocks * fmt.dim
    device = qw[0].device
    return {
        "qw": torch.cat(qw), "s": torch.cat(s).contiguous(),
        "esc_row": row, "esc_col": col, "esc_rest": rest.contiguous(),
        "esc_index": row * k + col, "esc_w": full,  # for the dequantized weight: these positions hold y · s
        "n": n, "k": k, "kp": kp, "dim": fmt.dim, "rotate": fmt.rotate, "seed": fmt.seed,
        "signs": hadamard.signs(k, fmt.seed, device) if fmt.rotate else None,
        "counters": torch.zeros(n // 16, dtype=torch.int32, device=device), "part": {}, "esc": {},
    }


def escapes(prep: dict, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The escapes as a launch with row groups of ``r`` tiles reads them: (ptr int32 [groups · chunks + 1], pos
    int32 (input << 6 | row within the group), value y − clamp(y) times the scale, float32), entries by row group and
    chunk (csrc/pvq_mma.cu). Built once per ``r``."""
    got = prep["esc"].get(r)
    if got is None:
        rows, chunks = 16 * r, prep["kp"] // CHUNK
        row, col = prep["esc_row"], prep["esc_col"]
        key = (row // rows) * chunks + col // CHUNK
        order = torch.sort(key, stable=True).indices
        ptr = torch.zeros((prep["n"] // rows) * chunks + 1, dtype=torch.int64, device=row.device)
        ptr[1:] = torch.bincount(key, minlength=(prep["n"] // rows) * chunks).cumsum(0)
        got = prep["esc"][r] = (ptr.to(torch.int32), ((col[order] << 6) | (row[order] % rows)).to(torch.int32),
                                prep["esc_rest"][order].contiguous())
    return got


def escape_fraction(prep: dict) -> float:
    return prep["esc_rest"].numel() / (prep["n"] * prep["k"])


def layout_bytes(prep: dict) -> int:
    """Bytes the kernel reads at the default launch (M = 1): codes, scales, the escape lists."""
    r = launch_config(prep["n"], prep["k"], prep["dim"], _sms(prep["qw"].device.index or 0))[0]
    return sum(t.numel() * t.element_size() for t in (prep["qw"], prep["s"], *escapes(prep, r)))


def dense(prep: dict) -> bool:
    """Whether the weight has more escapes than ``DENSE_ESCAPES`` (fewer rows of x, smaller row groups)."""
    return escape_fraction(prep) > DENSE_ESCAPES


def kernel_rows(prep: dict) -> int:
    """The most rows of x the default path sends to the kernel for this weight (``DENSE_ESCAPES``)."""
    return DENSE_MAX_M if dense(prep) else MAX_M


def layout_weight(qw: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """Pure-torch float32 [N, Kp] of the codes times their scales, escapes not included: the kernel's operands read
    back (``dequantize_layout``; the tests' torch stand-in for the kernel)."""
    return (codes_of(qw).float() - 8) * s.repeat_interleave(dim, 0)


def dequantize_layout(prep: dict) -> torch.Tensor:
    """Pure-torch float32 W·R (rotation not undone) from the prepared layout: what the kernel multiplies."""
    w = layout_weight(prep["qw"], prep["s"], prep["dim"])[:, :prep["k"]].contiguous()
    w.view(-1)[prep["esc_index"]] = prep["esc_w"]
    return w


@functools.lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(n: int, k: int, dim: int, sms: int, m: int = 1, dense: bool = False) -> tuple[int, int, int]:
    """(tiles a row group, warps a block, splits of the inputs) for ``m`` rows of x. H200 sweeps at M = 1 and 8
    (sweep_pvq2_v2_h200_s32.json, sweep_pvq2_h200_s33.json): with at least one block an SM of the largest row groups,
    those at 8 warps (two blocks an SM) — 14336 × 4096 (4, 8, 1) 13.05 µs against 17.36 with (2, 8, 1); fewer rows:
    the row groups nearest to one wave, 16 warps each (one such block fills an SM) — 4096 × 4096 (2, 16, 1) 6.65 µs,
    the best of 33 launches; 4096 × 14336 (2, 16, 1) 14.50 µs, 4 % behind the best, (4, 8, 4). Above 8 rows of x the
    same rule among the launches the extension builds (``valid_launch``): at M = 16 the best of six launches on each
    of the four shapes (sweep_pvq2_ms_h200_s33.json). ``dense`` escapes above 8 rows: row groups of at most 2 tiles
    (pvq3 14336 x 4096 M=16 (2, 8, 1) 79.6 µs against 144.3 with (4, 8, 1); M = 8 43.3 / 44.3 either way —
    sweep_pvq3_final_h200_s34.json). The inputs split only when there are fewer blocks than half the SMs, at least two
    chunks a warp."""
    chunks = -(-k // CHUNK)
    nt = n_tiles(m)
    options = [t for t in tile_options(dim) if valid_launch(t, 8, nt) and not (dense and m > 8 and t > 2)]
    big = options[-1]
    if n // (16 * big) >= sms:
        r, warps = big, 8
    else:
        r = next(t for t in options if n // (16 * t) <= sms)
        warps = 16 if valid_launch(r, 16, nt) else 8
    groups = n // (16 * r)
    splits = max(1, min(-(-sms // groups), chunks // (2 * warps))) if 2 * groups < sms else 1
    return r, warps, splits


def _part(prep: dict, splits: int, nt: int, device) -> torch.Tensor:
    p = prep["part"].get((splits, nt))
    if p is None:
        size = splits * prep["n"] * 8 * nt if splits > 1 else 1
        p = prep["part"][splits, nt] = torch.empty(size, dtype=torch.float32, device=device)
    return p


def gemm_tensors(x2, qw, s, dim: int, esc_ptr, esc_pos, esc_val, part, counters, n: int, r: int, warps: int,
                 splits: int) -> torch.Tensor:
    """x2 [M ≤ 32, Kp] (padded with zeros to whole chunks) → y [M, n] by the kernel."""
    return uniform_cuda.extension().pvq_gemm(x2.contiguous(), qw, s, dim, esc_ptr, esc_pos, esc_val, part, counters,
                                             n, r, warps, splits)


@torch.library.custom_op("llmcomp::pyramid_gemm", mutates_args=())
def gemm_op(x2: torch.Tensor, qw: torch.Tensor, s: torch.Tensor, dim: int, esc_ptr: torch.Tensor,
            esc_pos: torch.Tensor, esc_val: torch.Tensor, part: torch.Tensor, counters: torch.Tensor, n: int, r: int,
            warps: int, splits: int) -> torch.Tensor:
    """``gemm_tensors`` as one opaque op. ``part`` and ``counters`` are scratch the kernel overwrites before reading
    and leaves zero as it found them (not declared mutated, as ``codebook_cuda.lut_op``)."""
    return gemm_tensors(x2, qw, s, dim, esc_ptr, esc_pos, esc_val, part, counters, n, r, warps, splits)


@gemm_op.register_fake
def _(x2, qw, s, dim, esc_ptr, esc_pos, esc_val, part, counters, n, r, warps, splits):
    return x2.new_empty(x2.shape[0], n)


@torch.library.custom_op("llmcomp::pyramid_dequant", mutates_args=())
def dequant_op(qw: torch.Tensor, s: torch.Tensor, dim: int, n: int, k: int, esc_index: torch.Tensor,
               esc_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W·R [n, k] in ``dtype`` from the layout, the escapes' positions written with y · s: bit-equal to
    ``Pyramid.dequantize`` of the stored (rotated) weight."""
    w = uniform_cuda.extension().pvq_dequant(qw, s, dim, n, k, dtype == torch.bfloat16)
    w.view(-1)[esc_index] = esc_w.to(dtype)
    return w


@dequant_op.register_fake
def _(qw, s, dim, n, k, esc_index, esc_w, dtype):
    return qw.new_empty(n, k, dtype=dtype)


def _args(prep: dict, device, m: int, launch: Optional[tuple] = None) -> tuple:
    r, warps, splits = launch or launch_config(prep["n"], prep["k"], prep["dim"], _sms(device.index or 0), m,
                                               dense(prep))
    return (prep["qw"], prep["s"], prep["dim"], *escapes(prep, r), _part(prep, splits, n_tiles(m), device),
            prep["counters"], prep["n"], r, warps, splits)


def _kernel_input(x2: torch.Tensor, prep: dict) -> torch.Tensor:
    """x as the stored weight expects it: rotated (``rotate``: x · R in float32, then x's dtype), else as given."""
    if prep["rotate"]:
        x2 = hadamard.rotate(x2, prep["seed"], prep["signs"]).to(x2.dtype)
    return x2


def _through_kernel(x2: torch.Tensor, prep: dict, args: tuple) -> torch.Tensor:
    """The kernel on x2 (the kernel's input) with ``_args``' operands, x2 padded with zeros to whole chunks of 64
    inputs (the kernel reads them unchecked)."""
    if prep["kp"] != prep["k"]:
        x2 = F.pad(x2, (0, prep["kp"] - prep["k"]))
    return gemm_op(x2, *args)


def dequant_args(prep: dict, dtype: torch.dtype) -> tuple:
    """``dequant_op``'s operands for the prepared weight in ``dtype``."""
    return prep["qw"], prep["s"], prep["dim"], prep["n"], prep["k"], prep["esc_index"], prep["esc_w"], dtype


def gemm(x2: torch.Tensor, prep: dict, launch: Optional[tuple] = None) -> torch.Tensor:
    """x2 [M, K] → y [M, N] in x2's dtype, without bias: the kernel up to ``kernel_rows`` rows of x, or with a
    ``launch`` (tiles a row group, warps, splits — one of ``launches``) up to ``MAX_M``; dequantize + cuBLAS above."""
    x2 = _kernel_input(x2, prep)
    if x2.shape[0] <= (MAX_M if launch else kernel_rows(prep)):
        return _through_kernel(x2, prep, _args(prep, x2.device, x2.shape[0], launch))
    return F.linear(x2, dequant_op(*dequant_args(prep, x2.dtype)))


def prepared(fmt, tensors: dict, in_features: int, cache=None) -> dict:
    from llmcomp.kernels import cached

    return cached(cache, ("cuda-pvq",), tensors, lambda: prepare(fmt, tensors, in_features))


def linear(x: torch.Tensor, fmt, tensors: dict, in_features: int, bias=None, cache=None) -> torch.Tensor:
    from llmcomp.kernels import rows_linear

    prep = prepared(fmt, tensors, in_features, cache)
    return rows_linear(x, in_features, lambda x2: gemm(x2, prep), bias)


def frozen(fmt, tensors: dict, in_features: int, dtype: torch.dtype, cache=None):
    """``x2 [M, in_features] -> x2 @ W^T`` as ``gemm`` with everything prepared up front (the scratch for each
    n-tile count's default launch included), which ``torch.compile`` traces without a graph break."""
    prep = prepared(fmt, tensors, in_features, cache)
    rows = kernel_rows(prep)
    args = {nt: _args(prep, prep["qw"].device, 8 * nt) for nt in (1, 2, 4) if nt <= n_tiles(rows)}
    dq = dequant_args(prep, dtype)

    def run(x2):
        x2 = _kernel_input(x2, prep)
        if x2.shape[0] <= rows:
            return _through_kernel(x2, prep, args[n_tiles(x2.shape[0])])
        return F.linear(x2, dequant_op(*dq))

    return run
