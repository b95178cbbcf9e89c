"""Triton fast path for the ``codebook`` format (VPTQ-style vector quantization) at decode sizes, M ≤ 8.

Opt-in (``LLMCOMP_CODEBOOK_KERNEL=1``): correct on an H200 (tests/test_codebook_kernel.py) but slow there,
1.1–1.2 % of its byte roofline (one 2-byte gather per weight; docs/kernels.md) — the reference path is the
default. Also tested on CPU under ``TRITON_INTERPRET=1``.

Layout prepared once per weight (``prepare``, cached by the calling QuantLinear):
- ``idx{t}`` uint8 (stage bits ≤ 8), int16 (≤ 15) or int32 [N, nv] — each stage's indices unpacked from the
  tight bit stream, one per vector;
- ``cb{t}`` the stage's codebooks as stored, fp16 [n_groups, 2**bits, dim];
- ``scale`` fp32 [N] (ones without a per-channel scale);
- outlier columns: their dequantized weights [N, n_oc] in the activation dtype (computed once per dtype),
  multiplied by the matching inputs with one small matmul.

GEMV: each program owns ``BLOCK_N`` rows and a slice of the vectors (split along the input, partial sums in
fp32 summed in a fixed order afterwards — deterministic); a step covers ``BLOCK_V`` vectors, i.e.
``BLOCK_V · dim`` inputs: every index is read once per (row, vector) and the codebook entries are gathered
from L1/L2 (a 256-entry fp16 codebook of 4-vectors is 2 KB).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: ``prepare`` and ``supports`` still work, ``supports`` says no
    triton = tl = None

MAX_M = 8
MAX_STAGES = 2


def enabled() -> bool:
    return os.environ.get("LLMCOMP_CODEBOOK_KERNEL", "0") == "1"


def supports(fmt, x: torch.Tensor) -> bool:
    n_rows = x.numel() // x.shape[-1] if x.dim() else 0
    return (triton is not None and enabled() and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and 1 <= n_rows <= MAX_M and len(fmt.bits) <= MAX_STAGES and fmt.dim & (fmt.dim - 1) == 0)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The jitted kernel (defined on first use, so this module imports without triton)."""

    @triton.jit
    def _cb_gemv(x_ptr, idx0_ptr, cb0_ptr, idx1_ptr, cb1_ptr, scale_ptr, part_ptr, M, N, NV, stride_xm,
                 DIM: tl.constexpr, GROUP: tl.constexpr, E0: tl.constexpr, E1: tl.constexpr, STAGES: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT: tl.constexpr):
        BLOCK_K: tl.constexpr = BLOCK_V * DIM
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        kk = tl.arange(0, BLOCK_K)
        vv, dd = kk // DIM, kk % DIM  # vector within the step, element within the vector
        ms = tl.arange(0, BLOCK_M)
        m_ok = ms < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        steps = tl.cdiv(NV, BLOCK_V)
        per = tl.cdiv(steps, SPLIT)
        for s in range(pid_s * per, tl.minimum((pid_s + 1) * per, steps)):
            v = s * BLOCK_V + vv  # [BLOCK_K] vector of each input
            v_ok = v < NV
            ok = row_ok[:, None] & v_ok[None, :]
            if GROUP == 0:
                grp = v * 0
            else:
                grp = v * DIM // GROUP
            i0 = tl.load(idx0_ptr + rows[:, None] * NV + v[None, :], mask=ok, other=0).to(tl.int32)
            w = tl.load(cb0_ptr + ((grp[None, :] * E0 + i0) * DIM + dd[None, :]), mask=ok, other=0.0).to(tl.float32)
            if STAGES == 2:
                i1 = tl.load(idx1_ptr + rows[:, None] * NV + v[None, :], mask=ok, other=0).to(tl.int32)
                w += tl.load(cb1_ptr + ((grp[None, :] * E1 + i1) * DIM + dd[None, :]), mask=ok, other=0.0).to(tl.float32)
            xk = s * BLOCK_K + kk
            xb = tl.load(x_ptr + ms[:, None] * stride_xm + xk[None, :], mask=m_ok[:, None] & v_ok[None, :],
                         other=0.0).to(tl.float32)
            acc += tl.sum(xb[:, None, :] * w[None, :, :], axis=2)
        acc = acc * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
        tl.store(part_ptr + (pid_s * M + ms[:, None]) * N + rows[None, :], acc, mask=m_ok[:, None] & row_ok[None, :])

    return _cb_gemv


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    f = fmt.unpack(tensors, in_features)
    n = f["index0"].shape[0]
    width = lambda b: torch.uint8 if b <= 8 else torch.int16 if b <= 15 else torch.int32  # noqa: E731
    idx = [f[f"index{t}"].to(width(b)).contiguous() for t, b in enumerate(fmt.bits)]
    cbs = [f[f"codebook{t}"].contiguous() for t in range(len(fmt.bits))]
    dev = idx[0].device
    scale = f["scale"].float().contiguous() if fmt.scale else torch.ones(n, device=dev)
    prep = {"idx": idx, "cb": cbs, "scale": scale, "n": n, "nv": idx[0].shape[1]}
    prep.update(outlier_part(fmt, f, scale, in_features))
    return prep


def outlier_part(fmt, fields: dict, scale: torch.Tensor, in_features: int) -> dict:
    """The outlier columns kept apart (both codebook fast paths): the main columns' indices, the outlier
    columns and their scaled weights in fp32 (cast once per activation dtype by ``add_outliers``)."""
    part = {"outlier_w": {}}
    if "outlier_cols" in fields:
        cols = fields["outlier_cols"].to(torch.int64)
        part["main_cols"] = fmt.main_cols(cols, in_features, scale.device)
        part["outlier_cols"] = cols
        part["outlier_f32"] = fmt.outlier_weights(fields) * scale[:, None]
    return part


def add_outliers(y: torch.Tensor, x2: torch.Tensor, prep: dict) -> torch.Tensor:
    """y plus the outlier columns' product (none: y)."""
    if "outlier_cols" not in prep:
        return y
    w_out = prep["outlier_w"].get(x2.dtype)
    if w_out is None:
        w_out = prep["outlier_w"][x2.dtype] = prep["outlier_f32"].to(x2.dtype)
    return y + F.linear(x2.index_select(1, prep["outlier_cols"]), w_out).to(y.dtype)


def _config(n: int, nv: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, SPLIT): 64 inputs a step, enough programs to fill the GPU."""
    block_n, block_v = 16, max(1, 64 // dim)
    steps = -(-nv // block_v)
    programs = -(-n // block_n)
    split = 1
    while programs * split < 512 and split * 2 <= steps:
        split *= 2
    return block_n, block_v, split


def gemv(x2: torch.Tensor, fmt, prep: dict) -> torch.Tensor:
    """x2 [M, K] (M ≤ MAX_M) → y [M, N] in x2's dtype, without bias."""
    m = x2.shape[0]
    n, nv, dim = prep["n"], prep["nv"], fmt.dim
    xm = x2.index_select(1, prep["main_cols"]) if "main_cols" in prep else x2
    xm = xm.contiguous()
    block_n, block_v, split = _config(n, nv, dim)
    part = torch.empty(split, m, n, device=x2.device, dtype=torch.float32)
    idx, cb = prep["idx"], prep["cb"]
    stages = len(idx)
    two = stages == 2
    _kernel()[(triton.cdiv(n, block_n), split)](
        xm, idx[0], cb[0], idx[1] if two else idx[0], cb[1] if two else cb[0], prep["scale"], part, m, n, nv,
        xm.stride(0), DIM=dim, GROUP=fmt.group, E0=1 << fmt.bits[0], E1=1 << fmt.bits[1] if two else 1,
        STAGES=stages, BLOCK_M=max(2, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_V=block_v, SPLIT=split,
        num_warps=4)
    return add_outliers(part.sum(0), x2, prep).to(x2.dtype)


def linear(x: torch.Tensor, fmt, tensors: dict, in_features: int, bias=None, cache=None) -> torch.Tensor:
    from llmcomp.kernels import cached, rows_linear

    prep = cached(cache, ("codebook-triton",), tensors, lambda: prepare(fmt, tensors, in_features))
    return rows_linear(x, in_features, lambda x2: gemv(x2, fmt, prep), bias)
