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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

SWEEP_FORMATS = ("w4", "w3", "w2", "mxfp4", "nvfp4", "vq2", "vq3")
FLOAT_FORMATS = ("mxfp4", "nvfp4", "fp4", "vq2", "vq3", "pvq2", "pvq3")


@_cli.one_line_errors
def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", type=_cli.shapes(), default=None, help="e.g. 4096x4096,14336x4096 (N x K)")
    ap.add_argument("--ms", type=_cli.ints(1, "1,4,16"), default=None, help="e.g. 1,4,16")
    ap.add_argument("--bits", type=_cli.ints(2, "4,3", allow_empty=True), default="4")
    ap.add_argument("--group", type=_cli.count(1), default=128)
    ap.add_argument("--float-formats", type=_cli.names(FLOAT_FORMATS, allow_empty=True), default="mxfp4,nvfp4",
                    help="other formats to time too: mxfp4,nvfp4,fp4,vq2,vq3,pvq2,pvq3 ('' for none)")
    ap.add_argument("--fp16", action="store_true",
                    help="also time the uniform rows with float16 activations (with --sweep: sweep with them instead)")
    ap.add_argument("--sweep", default=None, choices=SWEEP_FORMATS,
                    help="instead, time one format's mma kernel over its launch parameters (kernel_bench.sweep; "
                         "M default 1,16): wN for uniform N-bit codes")
    ap.add_argument("--configs", type=_cli.launches(), default=None,
                    help="with --sweep, only these launches and the rule's pick: rt.warps.wr joined by commas "
                         "(e.g. 1.16.1,2.16.1)")
    args = ap.parse_args(argv)
    from llmcomp.eval import kernel_bench

    shapes = args.shapes or kernel_bench.SHAPES
    rows = [args.sweep] if args.sweep else [f"w{b}" for b in args.bits] + list(args.float_formats)
    if not rows:
        ap.error("--bits and --float-formats are both empty: nothing to time")
    _cli.check(ap, kernel_bench.check_shapes, shapes, rows, args.group)  # (a format that cannot store a shape)
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    if args.sweep:
        uniform = args.sweep[0] == "w"
        kernel_bench.sweep(shapes, args.ms or (1, 16), bits=int(args.sweep[1:]) if uniform else 4, group=args.group,
                           fmt="" if uniform else args.sweep, out=args.out, configs=args.configs, fp16=args.fp16)
        return
    kernel_bench.run(shapes, list(args.ms or kernel_bench.MS), args.bits, args.group, args.out,
                     float_formats=tuple(args.float_formats), fp16=args.fp16)


if __name__ == "__main__":
    main()
