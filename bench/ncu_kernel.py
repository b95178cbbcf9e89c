"""Launch the mma dequant-GEMM (and cuBLAS bf16 beside it) a few times for Nsight Compute to profile.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python3 bench/ncu_kernel.py

Only the launches between cudaProfilerStart/Stop are profiled: per shape and M, one warm-up call (not profiled),
then ``--calls`` calls of our kernel and one bf16 F.linear. ncu flushes the caches before each profiled kernel, so
every call reads its weight from HBM as in decode. ``--fp16`` uses float16 activations. ``--format vq2|vq3``
profiles the codebook kernel on random indices and codebooks instead (``--copies 1`` with one table, 16 the
bank-replicated one, 0 what ``QuantLinear`` runs: at one row on weights of ≥ 4096 × 4096 the lookup-table GEMV,
csrc/vq_lut.cu).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcomp.eval import kernel_bench
from llmcomp.formats import Uniform
from llmcomp.kernels import codebook_cuda, uniform_cuda
from llmcomp.quant.rtn import rtn_fields

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


def subject(name: str, n: int, k: int, bits: int, copies: int):
    """(call(x), bf16 weight of the same shape) for the kernel under the profiler."""
    w = torch.randn(n, k, device="cuda") * 0.02
    if name == "uniform":
        fmt = Uniform(bits=bits, group_size=128)
        prep = uniform_cuda.prepare(fmt, fmt.pack(rtn_fields(w, fmt)), k)
        return (lambda x: uniform_cuda.gemm(x, prep)), w
    fmt, packed = kernel_bench._packed_for(name, n, k)
    prep = codebook_cuda.prepare(fmt, packed, k)
    if copies == 0:
        return (lambda x: codebook_cuda.gemm(x, prep)), w
    return (lambda x: codebook_cuda.gemm(x, prep, replicated=copies > 1)), w


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", type=_cli.shapes(), default="4096x4096,28672x8192", help="N x K, comma-separated")
    ap.add_argument("--ms", type=_cli.ints(1, "1,16"), default="1", help="batch sizes")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calls", type=_cli.count(1), default=1)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--no-bf16", action="store_true", help="skip the cuBLAS peer")
    ap.add_argument("--format", default="uniform", choices=("uniform", "vq2", "vq3"))
    ap.add_argument("--copies", type=int, default=16, choices=(0, 1, 16),
                    help="codebook table copies (vq only; 0: the default path, the lookup-table GEMV at one row)")
    args = ap.parse_args()
    _cli.check(ap, Uniform, bits=args.bits, group_size=128)
    _cli.needs_cuda(ap)
    dtype = torch.float16 if args.fp16 else torch.bfloat16
    cudart = torch.cuda.cudart()
    for n, k in args.shapes:
        call, w = subject(args.format, n, k, args.bits, args.copies)
        wd = w.to(dtype)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            y = call(x)  # warm-up: builds the scale pairs, loads the kernel
            F.linear(x, wd)
            torch.cuda.synchronize()
            cudart.cudaProfilerStart()
            for _ in range(args.calls):
                y = call(x)
            if not args.no_bf16:
                F.linear(x, wd)
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
            print(f"{n}x{k} M={m} {dtype}: max |y| {y.abs().max().item():.3f}", flush=True)


if __name__ == "__main__":
    main()
