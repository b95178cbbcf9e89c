"""Dequant-GEMM benchmark on the GPU: llmcomp's uniform int4 fast path vs peers, in one run.

    python bench/bench_kernels.py --out bench/results/kernels_h100.json

For each layer shape (N out × K in) and batch M, times (CUDA graphs via triton.testing.do_bench_cudagraph):
- llmcomp int4 g128 asym (``QuantLinear`` → ``kernels.dequant_linear`` → Triton GEMV for M ≤ 8,
  dequantize + cuBLAS above),
- bf16 cuBLAS (``F.linear`` on the dense bf16 weight),
- torch's tinygemm int4 (``torch._weight_int4pack_mm``, group 128),
and reports each one's % of its own byte roofline: bytes it must move (weights + scales/zeros +
activations + output) / the device-to-device copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats import Uniform
from llmcomp.quant.rtn import rtn_fields

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]  # (N out, K in)
MS = [1, 4, 16, 64, 256]


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() / (ms * 1e-3)  # bytes read + written per second


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=100) * 1e-3


def tinygemm(x, w_int, n, k, group):
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(
            ((w_int[:, 1::2] << 4) | w_int[:, ::2]).to(torch.uint8).contiguous(), 8)
        sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
        fn = lambda: torch._weight_int4pack_mm(x, packed, group, sz)  # noqa: E731
        fn()
        return fn, None
    except Exception as exc:  # peer API differs across torch versions: record, don't fail the run
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,14336x4096 (N x K)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    bw = copy_bandwidth()
    rows, fmt = [], Uniform(bits=4, group_size=128)
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s")
    for n, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        fields = rtn_fields(w, fmt)
        q = QuantLinear.from_packed(fmt, fmt.pack(fields), k)
        w_bf16 = w.to(torch.bfloat16)
        packed_bytes = sum(t.numel() * t.element_size() for t in q.packed_tensors().values())
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            act_bytes = (m * k + m * n) * 2
            row = {"N": n, "K": k, "M": m}
            with torch.no_grad():
                t = timed(lambda: q(x))
            row["llmcomp_us"] = t * 1e6
            row["llmcomp_roofline_pct"] = 100 * (packed_bytes + act_bytes) / bw / t
            t = timed(lambda: F.linear(x, w_bf16))
            row["bf16_us"] = t * 1e6
            row["bf16_roofline_pct"] = 100 * (n * k * 2 + act_bytes) / bw / t
            fn, err = tinygemm(x, fields["codes"].int(), n, k, 128)
            if fn is not None:
                t = timed(fn)
                row["tinygemm_us"] = t * 1e6
                row["tinygemm_roofline_pct"] = 100 * (n * k // 2 + n * (k // 128) * 4 + act_bytes) / bw / t
            else:
                row["tinygemm_error"] = err
            row["speedup_vs_bf16"] = row["bf16_us"] / row["llmcomp_us"]
            rows.append(row)
            print(f"{n:6d}x{k:<6d} M={m:<4d} llmcomp {row['llmcomp_us']:8.1f} us {row['llmcomp_roofline_pct']:5.1f}%  "
                  f"bf16 {row['bf16_us']:8.1f} us {row['bf16_roofline_pct']:5.1f}%  "
                  + (f"tinygemm {row['tinygemm_us']:8.1f} us {row['tinygemm_roofline_pct']:5.1f}%"
                     if "tinygemm_us" in row else f"tinygemm n/a ({row.get('tinygemm_error')})"), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "copy_bandwidth_Bps": bw, "format": "int4 g128 asym", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
