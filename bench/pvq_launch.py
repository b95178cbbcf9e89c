"""Launch sweep of the PVQ kernel (csrc/pvq_mma.cu): every (tiles a row group, warps, splits) at each shape and M
against ``pyramid_cuda.launch_config``'s pick, timed as ``llmcomp bench kernels`` times (CUDA graphs, copies of the
weight cycled so every call reads HBM).
    python bench/pvq_launch.py --out sweep_pvq.json [--shapes 4096x4096] [--ms 1,8] [--format pvq2]
"""
import argparse
import json
from pathlib import Path

import torch

from llmcomp.core.memory import state_bytes
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import pyramid_cuda as pc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--format", default="pvq2", choices=sorted(kb.PYRAMID_FORMATS))
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else kb.SHAPES
    bw = kb.copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n, k in shapes:
        fmt, base = kb._packed_for(args.format, n, k)
        preps = [pc.prepare(fmt, base, k) for _ in range(kb._copies(state_bytes(base)))]
        rule = pc.launch_config(n, k, fmt.dim, sms)
        chunks = -(-k // pc.CHUNK)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            best = None
            for launch in sorted({(r, w, sp) for r in pc.tile_options(fmt.dim) for w in (4, 8, 16)
                                  for sp in (1, 2, 4, 8) if sp * w <= chunks} | {rule}):
                t = kb.per_call_seconds([lambda p=p: pc.gemm(x, p, launch) for p in preps])
                row = {"N": n, "K": k, "M": m, "launch": launch, "us": round(t * 1e6, 3),
                       "pct": round(kb.roofline_pct(state_bytes(base), m, n, k, bw, t), 2), "rule": launch == rule}
                rows.append(row)
                best = row if best is None or row["us"] < best["us"] else best
            ruled = next(r for r in rows if r["N"] == n and r["K"] == k and r["M"] == m and r["rule"])
            print(f"{args.format} {n}x{k} M={m}: rule {rule} {ruled['us']:.2f} us ({ruled['pct']:.1f} %), best "
                  f"{best['launch']} {best['us']:.2f} us ({best['pct']:.1f} %)", flush=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "format": args.format,
                                            "copy_bandwidth_Bps": bw, "rows": rows}, indent=1))
        del preps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
