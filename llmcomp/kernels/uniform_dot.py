"""Triton ``tl.dot`` dequant-GEMM for the ``uniform`` format (2, 4 and 8 bits) above the GEMV's rows (M > 8).

The CUDA mma kernel (``uniform_cuda``) gives each warp 16 weight rows and reads all of x for them; at M = 16–64 x's
traffic through L1/shared memory, not the weights' bytes, bounds it. Here a program owns a [BLOCK_N rows × BLOCK_M
inputs-rows] output tile: the weights are dequantized in registers as the A operand of the tensor-core product
(``out^T = W x^T``), x tiles are the B operand shared by all ``BLOCK_N`` rows, and Triton pipelines the loads.

Layout (``pack``, built once per weight from the canonical codes): int32 [N, K·bits/32]. K is cut into steps of
``S = 16 · 32/bits`` inputs (128 for 4 bits); a step is 16 words a row, and the code at shift ``j`` of word ``w``
is input ``j·16 + w`` of the step. So one shift of the step's [BLOCK_N, 16] words is a [BLOCK_N, 16] tile of
consecutive inputs, a ``tl.dot`` operand with no reshape. Scales and offsets (``mz = -zero·scale``) are fp32
[N, G]; a step lies in one group (``group % S == 0`` or one group a row). K is split over programs when there are
few row tiles (fp32 atomics into a zeroed buffer).
"""
from __future__ import annotations

import functools
import os

import torch

MIN_M = 9  # below: the CUDA mma GEMV kernel


def enabled() -> bool:
    """``LLMCOMP_DOT=0`` turns the path off (the mma kernel up to 64 rows, dequantize + cuBLAS above)."""
    return os.environ.get("LLMCOMP_DOT", "1").strip() != "0"


def step(bits: int) -> int:
    return 16 * (32 // bits)


def shape_ok(bits: int, group: int, in_features: int, out_features: int) -> bool:
    s = step(bits)
    return (bits in (2, 4, 8) and in_features % s == 0 and (group >= in_features or group % s == 0)
            and out_features % 16 == 0)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pack(codes: torch.Tensor, bits: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """Codes [N, K] → int32 [N, K·bits/32] in the step order of the module docstring."""
    n, k = codes.shape
    per_word = 32 // bits
    s = step(bits)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    out = torch.empty(n, k // per_word, dtype=torch.int32, device=codes.device)
    for r in range(0, n, rows_per_chunk):
        c = codes[r:r + rows_per_chunk].to(torch.int64)
        c = c.view(c.shape[0], k // s, per_word, 16).transpose(2, 3)  # [rows, steps, word, shift]
        w = (c << shifts).sum(-1)  # bit fields are disjoint: sum == or
        out[r:r + rows_per_chunk] = (w - ((w >> 31) << 32)).to(torch.int32).view(c.shape[0], -1)
    return out


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """``pack``'s inverse: int32 [N, K·bits/32] → codes int64 [N, K] (the reference the tests hold it to)."""
    n = words.shape[0]
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    w = words.to(torch.int64).view(n, -1, 16, 1)
    c = (w >> shifts) & ((1 << bits) - 1)  # [rows, steps, word, shift]
    return c.transpose(2, 3).reshape(n, -1)


def prepare(fmt, tensors: dict, in_features: int) -> dict:
    f = fmt.unpack(tensors, in_features)
    scale = f["scale"].float()
    return {"qd": pack(f["codes"], fmt.bits), "scale": scale.contiguous(), "mz": (-f["zero"].float() * scale).contiguous(),
            "group": fmt.group(in_features), "bits": fmt.bits, "n": f["codes"].shape[0], "k": in_features}


def config(m: int, n: int, k: int, bits: int, sms: int) -> dict:
    """Launch parameters: BLOCK_M the smallest of 16/32/64 that holds M (64-row tiles above), BLOCK_N 128 rows on
    wide layers and 64 otherwise, and K split until there are about two programs an SM."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 128 if n >= 8192 else 64
    tiles = -(-n // block_n) * -(-m // block_m)
    steps = k // step(bits)
    split = 1
    while tiles * split * 2 <= 2 * sms and steps % (split * 2) == 0 and steps // (split * 2) >= 4:
        split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLIT_K": split, "num_warps": 4, "num_stages": 4}


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(x_ptr, qd_ptr, s_ptr, mz_ptr, out_ptr, M, N, words_per_row, NG, stride_xm, stride_om,
                   PER_SPLIT: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT_K: tl.constexpr):
        PER_WORD: tl.constexpr = 32 // BITS
        S: tl.constexpr = 16 * PER_WORD
        MASK: tl.constexpr = (1 << BITS) - 1
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m  # x's row tiles vary fastest: the programs of one weight tile run together
        pid_n = pid // num_m
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        m_ok = ms < M
        w16 = tl.arange(0, 16)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for i in range(PER_SPLIT):  # constexpr trip count (one compile per K and split)
            s = pid_k * PER_SPLIT + i
            words = tl.load(qd_ptr + rows[:, None] * words_per_row + s * 16 + w16[None, :], mask=row_ok[:, None],
                            other=0)
            g = (s * S) // GROUP
            sc = tl.load(s_ptr + rows * NG + g, mask=row_ok, other=0.0)[:, None]
            mz = tl.load(mz_ptr + rows * NG + g, mask=row_ok, other=0.0)[:, None]
            # [BLOCK_N, shift, word] flattened row-major is input shift·16 + word: the step's S inputs in order
            q = (words[:, None, :] >> (tl.arange(0, PER_WORD) * BITS)[None, :, None]) & MASK
            q = tl.reshape(q, (BLOCK_N, S)) | 0x4B000000  # 2^23 + q as an fp32 bit pattern: no int→float
            w = (q.to(tl.float32, bitcast=True) - 8388608.0) * sc + mz
            xv = tl.load(x_ptr + ms[None, :] * stride_xm + s * S + tl.arange(0, S)[:, None], mask=m_ok[None, :],
                         other=0.0)  # x^T [S, BLOCK_M]
            acc = tl.dot(w.to(xv.dtype), xv, acc)
        ptrs = out_ptr + ms[None, :] * stride_om + rows[:, None]
        ok = row_ok[:, None] & m_ok[None, :]
        if SPLIT_K == 1:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.atomic_add(ptrs, acc, mask=ok)

    return dot_kernel


def dot(x2: torch.Tensor, prep: dict, cfg: dict | None = None) -> torch.Tensor:
    """x2 [M, K] (fp16/bf16) → y [M, N] in x2's dtype. ``cfg``: ``config``'s keys, to time other choices."""
    m, k = x2.shape
    n, bits = prep["n"], prep["bits"]
    x2 = x2.contiguous()
    if cfg is None:
        cfg = config(m, n, k, bits, _sms(x2.device))
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    steps = k // step(bits)
    if steps % split:
        raise ValueError(f"SPLIT_K={split} does not divide the {steps} steps of K={k}")
    out = torch.zeros(m, n, device=x2.device, dtype=torch.float32) if split > 1 else x2.new_empty(m, n)
    grid = (-(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"]), split)
    _kernel()[grid](x2, prep["qd"], prep["scale"], prep["mz"], out, m, n, k * bits // 32, prep["scale"].shape[1], x2.stride(0),
                    out.stride(0), PER_SPLIT=steps // split, GROUP=min(prep["group"], k), BITS=bits, SPLIT_K=split, **cfg)
    return out.to(x2.dtype) if split > 1 else out


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count
