"""Launch sweep of the PVQ kernel (csrc/pvq_mma.cu): every (tiles a row group, warps, splits) at each shape and M
against ``pyramid_cuda.launch_config``'s pick, timed as ``llmcomp bench kernels`` times (CUDA graphs, copies of the
weight cycled so every call reads HBM); beside them bf16 cuBLAS and the dequantize + cuBLAS path (``--baselines``).
    python bench/pvq_launch.py --out sweep_pvq.json [--shapes 4096x4096] [--ms 1,8] [--format pvq2]
        [--launches 2x8x1,4x8x1]   (only these launches and the rule's)
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcomp.core.memory import state_bytes
from llmcomp.core.paths import write_json
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import pyramid_cuda as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


@_cli.one_line_errors
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", type=_cli.shapes(), default=None)
    ap.add_argument("--ms", type=_cli.ints(1, "1,8"), default="1,8")
    ap.add_argument("--format", default="pvq2", choices=sorted(kb.PYRAMID_FORMATS))
    ap.add_argument("--launches", type=_cli.launches("x", ",", "1x4x1,2x4x1"), default=None,
                    help="tiles x warps x splits, comma-separated (default: all)")
    ap.add_argument("--baselines", action="store_true", help="also time bf16 cuBLAS and dequantize + cuBLAS")
    args = ap.parse_args()
    chosen = set(args.launches or ())
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    shapes = args.shapes or kb.SHAPES
    bw = kb.copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    result = {"device": torch.cuda.get_device_name(), "format": args.format, "copy_bandwidth_Bps": bw, "rows": rows}
    for n, k in shapes:
        fmt, base = kb._packed_for(args.format, n, k)
        preps = [pc.prepare(fmt, base, k) for _ in range(kb._copies(state_bytes(base)))]
        weights = ([torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(kb._copies(n * k * 2))]
                   if args.baselines else [])
        chunks = -(-k // pc.CHUNK)
        for m in args.ms:
            rule = pc.launch_config(n, k, fmt.dim, sms, m, pc.dense(preps[0]))
            built = set(pc.launches(fmt.dim, m, chunks))
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            best = None
            for launch in sorted((chosen & built if chosen else built) | {rule}):
                t = kb.per_call_seconds([lambda p=p: pc.gemm(x, p, launch) for p in preps])
                row = {"N": n, "K": k, "M": m, "launch": launch, "us": round(t * 1e6, 3),
                       "pct": round(kb.roofline_pct(state_bytes(base), m, n, k, bw, t), 2), "rule": launch == rule}
                rows.append(row)
                best = row if best is None or row["us"] < best["us"] else best
            ruled = next(r for r in rows if r["N"] == n and r["K"] == k and r["M"] == m and r["rule"])
            line = (f"{args.format} {n}x{k} M={m}: rule {rule} {ruled['us']:.2f} us ({ruled['pct']:.1f} %), best "
                    f"{best['launch']} {best['us']:.2f} us ({best['pct']:.1f} %)")
            if args.baselines:
                for name, fns in (("bf16", [lambda w=w: F.linear(x, w) for w in weights]),
                                  ("dequant", [lambda p=p: F.linear(x, pc.dequant_op(*pc.dequant_args(p, x.dtype)))
                                               for p in preps])):
                    t = kb.per_call_seconds(fns)
                    rows.append({"N": n, "K": k, "M": m, "launch": name, "us": round(t * 1e6, 3)})
                    line += f", {name} {t * 1e6:.2f} us (rule {t * 1e6 / ruled['us']:.2f}x)"
            print(line, flush=True)
            write_json(args.out, result, partial=True)
        del preps, weights
        torch.cuda.empty_cache()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
