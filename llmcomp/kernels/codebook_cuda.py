"""CUDA fast path for the ``codebook`` format (VPTQ-style VQ): the mma dequant-GEMM of ``uniform_cuda`` with the
weights looked up in shared-memory codebooks (``csrc/uniform_mma.cuh``, ELEM 4 / 5), for 1–64 rows of x.

Takes 4-vectors with one codebook a layer (``group`` 0), a first stage of ≤ 8 index bits and an optional second
of ≤ 4 (VPTQ's 2- and 3-bit settings), 16 | N and 128 | the main input columns. Outlier columns are multiplied
apart (their dequantized weights, once per dtype); anything else takes the next path (Triton, opt-in) or the
reference.

Layout (built once per weight by ``prepare``): the kernel's 2-bit shape — 16-row tiles × kblocks of 128 inputs,
lane (g, c) owning inputs [32c, 32c + 32) of a kblock, i.e. vectors 8c … 8c + 7 — and per lane 16 bytes: byte
2s + r = the stage-0 index of vector 8c + s of row g + 8r; the second stage's indices as nibbles in the same order
(8 bytes a lane). The codebooks become one table [entries, 4] in the activation dtype (stage 1's from row
2**bits[0]); the per-row scale is applied to the fp32 accumulators. In shared memory the table is replicated 16
times across the bank pairs (``replicate``), each lane reading its own copy, so random indices never make a
half-warp's lookups collide on a bank (with one table they did, several ways on average).
"""
from __future__ import annotations

import functools
import os

import torch

from llmcomp.kernels import uniform_cuda
from llmcomp.kernels.codebook_triton import add_outliers, outlier_part


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


def planes(fmt, fields: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stage-0 bytes as int32 [N/16, KB, 32, 4], stage-1 nibbles as int32 [N/16, KB, 32, 2] or None), the
    vectors padded to whole kblocks."""
    def idx(t):
        t = fields[f"index{t}"].to(torch.int64)
        return torch.nn.functional.pad(t, (0, padded_main(t.shape[1] * 4) // 4 - t.shape[1]))

    idx0 = _lanes(idx(0)).to(torch.uint8).contiguous()
    q0 = idx0.view(torch.int32)
    if len(fmt.bits) == 1:
        return q0, None
    n1 = _lanes(idx(1))
    q1 = (n1[..., 0::2] | (n1[..., 1::2] << 4)).to(torch.uint8).contiguous()
    return q0, q1.view(torch.int32)


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    f = fmt.unpack(tensors, in_features)
    n = f["index0"].shape[0]
    qw, qh = planes(fmt, f)
    table = torch.cat([f[f"codebook{t}"].float().reshape(-1, 4) for t in range(len(fmt.bits))])
    scale = f["scale"].float() if fmt.scale else torch.ones(n, device=qw.device)
    prep = {"qw": qw, "qh": qh, "table32": table, "tables": {}, "cb1_at": (1 << fmt.bits[0]) if qh is not None else 0,
            "scale": scale.reshape(n, 1).contiguous(), "n": n, "kp": padded_main(fmt.n_main(in_features))}
    prep.update(outlier_part(fmt, f, scale, in_features))
    return prep


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
    _, warps, wr = uniform_cuda.launch_config(n, k, 2, m, staged=False)
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
    return os.environ.get("LLMCOMP_VQ_REPLICATE", "1").strip() != "0"


def copies(prep: dict, want: bool | None = None) -> int:
    """Table copies for the kernel: 16 when replicating and the table is small enough (≤ 512 entries), else 1."""
    return 16 if (replicate() if want is None else want) and prep["table32"].shape[0] <= 512 else 1


def gemm(x2: torch.Tensor, prep: dict, launch: tuple | None = None, replicated: bool | None = None) -> torch.Tensor:
    """x2 [M, K] (M ≤ 64) → y [M, N] in x2's dtype, without bias. ``replicated``: default ``replicate()``."""
    xm = x2.index_select(1, prep["main_cols"]) if "main_cols" in prep else x2
    y = gemm_tensors(xm, prep["qw"], uniform_cuda.high_plane(prep), table(prep, x2.dtype), prep["scale"], prep["n"],
                     prep["cb1_at"], prep["kp"], copies(prep, replicated), launch)
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


def linear(x: torch.Tensor, fmt, tensors: dict, in_features: int, bias=None, cache=None) -> torch.Tensor:
    from llmcomp.kernels import cached, rows_linear

    prep = cached(cache, ("cuda-vq",), tensors, lambda: prepare(fmt, tensors, in_features))
    return rows_linear(x, in_features, lambda x2: gemm(x2, prep), bias)


def frozen(fmt, tensors: dict, in_features: int, dtype: torch.dtype, cache=None):
    """``x2 [M ≤ 64, in_features] -> x2 @ W^T`` over this weight's prepared layout: one ``gemm_op`` call (plus the
    outlier columns' product in plain torch) that ``torch.compile`` traces without a graph break."""
    from llmcomp.kernels import cached

    prep = cached(cache, ("cuda-vq",), tensors, lambda: prepare(fmt, tensors, in_features))
    args = (prep["qw"], uniform_cuda.high_plane(prep), table(prep, dtype), prep["scale"], prep["n"], prep["cb1_at"],
            prep["kp"], copies(prep))
    main, cols = prep.get("main_cols"), prep.get("outlier_cols")
    w_out = prep["outlier_f32"].to(dtype) if cols is not None else None

    def run(x2):
        y = gemm_op(x2.index_select(1, main) if main is not None else x2, *args)
        return y if cols is None else y + torch.nn.functional.linear(x2.index_select(1, cols), w_out)

    return run

