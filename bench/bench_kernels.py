"""Dequant-GEMM benchmark (see llmcomp/eval/kernel_bench.py; also ``llmcomp bench kernels``).

    python bench/bench_kernels.py --out bench/results/kernels_h100.json [--shapes 4096x4096] [--bits 4,2]
        [--float-formats mxfp4,nvfp4] [--fp16]
    python bench/bench_kernels.py --sweep w4 --out sweep.json [--shapes 4096x4096] [--ms 32,64]   (launch sweep)
    python bench/bench_kernels.py --sweep w3 --ms 2,4 --configs 1.4.1,2.4.1 --out rule.json   (the rule's pick and
        these; --fp16: float16 activations)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SWEEP_FORMATS = ("w4", "w3", "w2", "mxfp4", "nvfp4", "vq2", "vq3")

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,14336x4096 (N x K)")
    ap.add_argument("--ms", default=None, help="e.g. 1,4,16")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--float-formats", default="mxfp4,nvfp4",
                    help="other formats to time too: mxfp4,nvfp4,fp4,vq2,vq3,pvq2,pvq3 ('' for none)")
    ap.add_argument("--fp16", action="store_true",
                    help="also time the uniform rows with float16 activations (with --sweep: sweep with them instead)")
    ap.add_argument("--sweep", default=None, choices=SWEEP_FORMATS,
                    help="instead, time one format's mma kernel over its launch parameters (kernel_bench.sweep; "
                         "M default 1,16): wN for uniform N-bit codes")
    ap.add_argument("--configs", default=None,
                    help="with --sweep, only these launches and the rule's pick: rt.warps.wr joined by commas "
                         "(e.g. 1.16.1,2.16.1)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/bench_kernels.py times CUDA kernels; no GPU is visible to torch here.")
    from llmcomp.eval import kernel_bench

    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else kernel_bench.SHAPES)
    if args.sweep:
        uniform = args.sweep[0] == "w"
        kernel_bench.sweep(shapes, tuple(int(m) for m in args.ms.split(",")) if args.ms else (1, 16),
                           bits=int(args.sweep[1:]) if uniform else 4, group=args.group,
                           fmt="" if uniform else args.sweep, out=args.out,
                           configs=[tuple(int(v) for v in c.split(".")) for c in args.configs.split(",")]
                           if args.configs else None, fp16=args.fp16)
        return
    ms = [int(m) for m in args.ms.split(",")] if args.ms else kernel_bench.MS
    kernel_bench.run(shapes, ms, tuple(int(b) for b in args.bits.split(",")), args.group, args.out,
                     float_formats=tuple(f for f in args.float_formats.split(",") if f), fp16=args.fp16)


if __name__ == "__main__":
    main()
