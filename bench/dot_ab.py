"""The Triton tl.dot dequant-GEMM (``llmcomp/kernels/uniform_dot.py``) against the CUDA path it would replace above
M = 8 (the mma kernel up to 64 rows, dequantize + cuBLAS above) and bf16 cuBLAS, W4 g128 bf16, each call reading its
weight from HBM (``kernel_bench.per_call_seconds`` over rotating copies).

    python bench/dot_ab.py --out dot_ab.json                       # uniform_dot.config's pick, all shapes and M
    python bench/dot_ab.py --out grid.json --grid --shapes 4096x4096 --ms 16,64   # every configuration of a small grid
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcomp.core.memory import state_bytes
from llmcomp.eval import kernel_bench as kb
from llmcomp.formats import Uniform
from llmcomp.kernels import uniform_cuda, uniform_dot
from llmcomp.quant.rtn import rtn_fields

SHAPES = "4096x4096,14336x4096,4096x14336,28672x8192,6144x4096,28672x4096"


def grid(m: int):
    bms = sorted({16 if m <= 16 else 32 if m <= 32 else 64, 64 if m > 32 else 16 if m <= 16 else 32})
    for bm, bn, split, (warps, stages) in itertools.product(bms, (64, 128, 256), (1, 2, 4, 8), ((4, 3), (4, 4), (8, 3))):
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default="16,32,64,128,256")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--grid", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bw = kb.copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw, "bits": args.bits, "group": args.group,
              "dtype": args.dtype, "rows": []}
    fmt = Uniform(bits=args.bits, group_size=args.group)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda") * 0.02
        base = fmt.pack(rtn_fields(w, fmt))
        nbytes = state_bytes(base)
        copies = [{kk: v.clone() for kk, v in base.items()} for _ in range(kb._copies(nbytes))]
        dots = [uniform_dot.prepare(fmt, t, k) for t in copies]
        mmas = [uniform_cuda.prepare(fmt, t, k) for t in copies]
        del copies
        wb = [w.to(dtype) for _ in range(kb._copies(n * k * 2))]
        ref_w = fmt.dequantize(base, k).to(dtype)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            want = F.linear(x.float(), ref_w.float())
            scale = want.abs().max().item()
            cuda_call = ((lambda p: uniform_cuda.gemm(x, p)) if m <= uniform_cuda.MAX_M
                         else (lambda p: F.linear(x, uniform_cuda.dequantize(p, k, dtype))))
            row = {"N": n, "K": k, "M": m}
            row["cuda_us"] = round(kb.per_call_seconds([lambda p=p: cuda_call(p) for p in mmas]) * 1e6, 3)
            row["bf16_us"] = round(kb.per_call_seconds([lambda v=v: F.linear(x, v) for v in wb]) * 1e6, 3)
            configs = list(grid(m)) if args.grid else [uniform_dot.config(m, n, k, args.bits, sms)]
            best = None
            for cfg in configs:
                steps = k // uniform_dot.step(args.bits)
                if steps % cfg["SPLIT_K"]:
                    continue
                try:
                    err = (uniform_dot.dot(x, dots[0], cfg).float() - want).abs().max().item() / scale
                    t = kb.per_call_seconds([lambda p=p: uniform_dot.dot(x, p, cfg) for p in dots])
                except Exception as exc:  # out of shared memory etc.: recorded, not fatal
                    result["rows"].append({**row, "cfg": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                    continue
                r = {**row, "cfg": cfg, "dot_us": round(t * 1e6, 3), "rel_err": err,
                     "dot_roofline_pct": round(kb.roofline_pct(nbytes, m, n, k, bw, t), 2),
                     "dot_vs_bf16": round(row["bf16_us"] / (t * 1e6), 3), "dot_vs_cuda": round(row["cuda_us"] / (t * 1e6), 3)}
                result["rows"].append(r)
                if best is None or r["dot_us"] < best["dot_us"]:
                    best = r
            if best:
                print(f"{n:6d}x{k:<6d} M={m:<4d} dot {best['dot_us']:8.2f}us {best['dot_roofline_pct']:5.1f}%  cuda {row['cuda_us']:8.2f}"
                      f"  bf16 {row['bf16_us']:8.2f}  vs bf16 {best['dot_vs_bf16']:.2f}x vs cuda {best['dot_vs_cuda']:.2f}x"
                      f"  err {best['rel_err']:.1e}  {best['cfg'] if args.grid else ''}", flush=True)
            args.out.write_text(json.dumps(result, indent=0))
        del dots, mmas, wb
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
