"""Triton fast path for the ``uniform`` format (2, 4 and 8 bits) on CUDA.

Layout prepared once per weight (``prepare``, cached by the calling QuantLinear):
- ``qweight`` int32 [N, K·bits/32] — the canonical little-endian bit stream (formats/bitpack.py) viewed
  as int32 words, so code ``k`` of a row sits in word ``k // (32/bits)`` at bit ``bits·(k % (32/bits))``;
  no repacking is needed.
- ``scale`` fp16 [N, G] and ``mz`` fp16 [N, G] with ``mz = -zero·scale``, so ``w = q·scale + mz``.

GEMV (M ≤ ``GEMV_MAX_M``): each program owns ``BLOCK_N`` output rows and a slice of K (split-K with
fp32 atomics when K is long); a K-step of ``BLOCK_K`` columns lies inside one group, so it reads one
scale and offset per row, and products accumulate element-wise until one final reduction. Larger M (prefill)
dequantizes with a Triton kernel into the activation dtype and calls cuBLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmcomp.kernels.switches import env_off

GEMV_MAX_M = 8
AUTOTUNE = not env_off("LLMCOMP_TRITON_AUTOTUNE")


def _configs():
    return [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=w)
            for bn in (8, 16, 32, 64) for sk in (1, 2, 4, 8, 16) for w in (2, 4, 8)]


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, scale_ptr, mz_ptr, out_ptr, N, K, NG, stride_xm, stride_om,
                 GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    # BLOCK_K divides GROUP: every K-step lies in one group (one scale and offset per row).
    # Codes stay in their words: a step is a [BLOCK_N, WORDS, PER_WORD] tile, column k = word·PER_WORD + j,
    # and x is read in the same [WORDS, PER_WORD] shape, so nothing is reshaped or gathered.
    # Products accumulate element-wise; the reduction over K happens once, after the loop.
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    words_per_row = K // PER_WORD
    w_off = tl.arange(0, WORDS)
    j = tl.arange(0, PER_WORD)
    shifts = (j * BITS)[None, None, :]
    acc = tl.zeros((BLOCK_N, WORDS, PER_WORD), dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    for s in range(pid_k * per_split, tl.minimum((pid_k + 1) * per_split, steps)):
        wi = s * WORDS + w_off
        w_ok = wi < words_per_row
        words = tl.load(qw_ptr + rows[:, None] * words_per_row + wi[None, :],
                        mask=row_ok[:, None] & w_ok[None, :], other=0)
        q = ((words[:, :, None] >> shifts) & ((1 << BITS) - 1)).to(tl.float32)
        ks = wi[:, None] * PER_WORD + j[None, :]
        x = tl.load(x_ptr + m * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
        g = (s * BLOCK_K) // GROUP
        sc = tl.load(scale_ptr + rows * NG + g, mask=row_ok, other=0.0).to(tl.float32)
        mz = tl.load(mz_ptr + rows * NG + g, mask=row_ok, other=0.0).to(tl.float32)
        acc += (q * sc[:, None, None] + mz[:, None, None]) * x[None, :, :]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + m * stride_om + rows, out, mask=row_ok)
    else:
        tl.atomic_add(out_ptr + m * stride_om + rows, out, mask=row_ok)


_gemv_tuned = triton.autotune(configs=_configs(), key=["N", "K", "GROUP", "BITS", "BLOCK_K"],
                              reset_to_zero=["out_ptr"])(_gemv_kernel)


def _heuristic(n: int) -> dict:
    """Launch parameters without autotuning (LLMCOMP_TRITON_AUTOTUNE=0, e.g. in tests)."""
    return {"BLOCK_N": 16, "SPLIT_K": 1 if n >= 8192 else 4, "num_warps": 4}


@triton.jit
def _dequant_kernel(qw_ptr, scale_ptr, mz_ptr, w_ptr, N, K, NG, GROUP: tl.constexpr, BITS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] = q·scale + mz, written in the activation dtype (prefill path); same tiling as the GEMV."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wi = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    j = tl.arange(0, PER_WORD)
    words = tl.load(qw_ptr + rows[:, None] * (K // PER_WORD) + wi[None, :],
                    mask=(rows < N)[:, None] & (wi < K // PER_WORD)[None, :], other=0)
    q = ((words[:, :, None] >> (j * BITS)[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    ks = wi[:, None] * PER_WORD + j[None, :]  # (WORDS, PER_WORD)
    mask = (rows < N)[:, None, None] & (ks < K)[None, :, :]
    g = ks // GROUP
    sc = tl.load(scale_ptr + rows[:, None, None] * NG + g[None, :, :], mask=mask, other=0.0).to(tl.float32)
    mz = tl.load(mz_ptr + rows[:, None, None] * NG + g[None, :, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + rows[:, None, None] * K + ks[None, :, :], (q * sc + mz).to(w_ptr.dtype.element_ty), mask=mask)


def supports(fmt, x: torch.Tensor) -> bool:
    """Whether these kernels take the layer: whole 32-bit words of codes a row (``prepare``) and K-steps of at
    least one word inside a group (``_block_k``); anything else takes the reference path."""
    if fmt.bits not in (2, 4, 8) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    k, per_word = x.shape[-1], 32 // fmt.bits
    return k % per_word == 0 and _block_k(fmt.group(k)) >= per_word


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    """Kernel layout from the canonical tensors (see module docstring)."""
    packed = tensors["weight_packed"]
    n = packed.shape[0]
    per_word = 32 // fmt.bits
    if in_features % per_word:
        raise ValueError(f"in_features must be divisible by {per_word} for the {fmt.bits}-bit kernel")
    qweight = packed[:, : in_features * fmt.bits // 8].contiguous().view(torch.int32)
    scale = tensors["weight_scale"].float()
    if fmt.symmetric:
        zero = torch.full_like(scale, float(1 << (fmt.bits - 1)))
    else:
        zero = tensors["weight_zero"].float()
    return {"qweight": qweight, "scale": scale.half().contiguous(), "mz": (-zero * scale).half().contiguous(),
            "group": fmt.group(in_features), "n": n}


def _block_k(group: int) -> int:
    """The largest power of two ≤ 256 that divides the group (a K-step never straddles groups)."""
    block = 256
    while group % block:
        block //= 2
    return block


def gemv(x2: torch.Tensor, prep: dict, bits: int, in_features: int) -> torch.Tensor:
    """x2: [M, K] (M ≤ GEMV_MAX_M) → fp32 [M, N]."""
    m, k = x2.shape
    n = prep["n"]
    out = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
    block_k = _block_k(prep["group"])

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m)

    args = (x2, prep["qweight"], prep["scale"], prep["mz"], out, n, k, prep["scale"].shape[1], x2.stride(0),
            out.stride(0))
    meta = dict(GROUP=prep["group"], BITS=bits, BLOCK_K=block_k)
    if AUTOTUNE:
        _gemv_tuned[grid](*args, **meta)
    else:
        meta.update(_heuristic(n))
        _gemv_kernel[grid(meta)](*args, **meta)
    return out


def dequantize(prep: dict, bits: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    n, k = prep["n"], in_features
    w = torch.empty(n, k, device=prep["qweight"].device, dtype=dtype)
    bn, bk = 16, 256
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        prep["qweight"], prep["scale"], prep["mz"], w, n, k, prep["scale"].shape[1], GROUP=prep["group"],
        BITS=bits, BLOCK_N=bn, BLOCK_K=bk)
    return w


def linear(x: torch.Tensor, fmt, tensors: dict, in_features: int, bias=None, cache=None) -> torch.Tensor:
    from llmcomp.kernels import cached

    prep = cached(cache, ("triton",), tensors, lambda: prepare(fmt, tensors, in_features))
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] <= GEMV_MAX_M:
        y = gemv(x2.contiguous(), prep, fmt.bits, in_features).to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
    else:
        y = F.linear(x2, dequantize(prep, fmt.bits, in_features, x.dtype), bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])
