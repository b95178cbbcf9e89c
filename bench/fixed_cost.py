"""What a W4 GEMM call costs besides its bytes, at M = 1 (bf16), for the decode step's small projections.

In the compiled 8B decode the q/k/v call (6144 × 4096) takes ~7.5 µs for 3.2 µs of bytes and o (4096 × 4096) ~5 µs
for 2.1, and asking L2 for o's weights beforehand saved only 0.4 µs a call (kernels_h200_notes.md, sixteenth
session): their time is mostly a fixed cost. This splits it: for N rows and a sweep of K (the launch configuration
``launch_config`` picks for the real layer, held fixed, so only the bytes change), each call timed

- ``cold``: copies of the weight cycled in one CUDA graph, so every call reads HBM (as ``bench kernels`` times);
- ``warm``: one weight called again and again, so after the first call it comes from L2;

with dependent launch off and on, and a least-squares line through time against bytes per setting: the intercept
is the fixed cost a call (launch, ramp, the K split's reduction, the epilogue), the slope's inverse the bandwidth
the kernel streams at once it runs. The launch floor (a 1-element add, timed the same way) is printed beside.

    python bench/fixed_cost.py --out bench/results/fixed_cost_h200.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llmcomp.core.paths import write_json
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import uniform_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

# from 1024 up: below, the kernel clamps its warps splitting K to the kblocks there are (16 at K = 1024), which
# would change the launch configuration this holds fixed
KS = [1024, 2048, 3072, 4096, 6144, 8192, 14336]
NS = {4096: 4096, 6144: 4096}  # N -> the K of the decode layer whose launch configuration is held (o, q/k/v)


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - slope * mx, slope


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ks", type=_cli.ints(1, "4096,8192"), default=",".join(map(str, KS)))
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    ks = list(args.ks)
    before = uniform_cuda.dependent_launch()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_tb_s": None,
              "launch_floor_us": None, "rows": [], "fits": []}
    bw = kb.copy_bandwidth()
    result["copy_bandwidth_tb_s"] = round(bw / 1e12, 3)
    result["launch_floor_us"] = round(kb.launch_floor_seconds() * 1e6, 3)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, launch floor {result['launch_floor_us']:.2f} µs")
    try:
        for n, k_real in NS.items():
            config = uniform_cuda.launch_config(n, k_real, 4, 1)
            for pdl in (False, True):
                uniform_cuda.set_dependent_launch(pdl)
                for k in ks:
                    nbytes, preps, call, _ = kb._sweep_subject("W4", n, k, 4, 128)
                    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
                    for p in preps:
                        call(x, p, config)
                    cold = kb.per_call_seconds([lambda p=p: call(x, p, config) for p in preps])
                    warm = kb.per_call_seconds([lambda: call(x, preps[0], config)] * 32)
                    row = {"N": n, "K": k, "config": list(config), "pdl": pdl, "bytes": nbytes,
                           "cold_us": round(cold * 1e6, 3), "warm_us": round(warm * 1e6, 3),
                           "bytes_us": round(nbytes / bw * 1e6, 3)}
                    result["rows"].append(row)
                    print(f"N={n} K={k:5d} pdl={int(pdl)} config={config}: cold {row['cold_us']:.2f} µs, "
                          f"warm {row['warm_us']:.2f} µs, bytes {row['bytes_us']:.2f} µs")
                    write_json(args.out, result, partial=True)
                    del preps
                rows = [r for r in result["rows"] if r["N"] == n and r["pdl"] == pdl]
                for kind in ("cold", "warm"):
                    b0, slope = line_fit([r["bytes"] for r in rows], [r[f"{kind}_us"] for r in rows])
                    fit = {"N": n, "pdl": pdl, "kind": kind, "fixed_us": round(b0, 3),
                           "stream_tb_s": round(1e6 / slope / 1e12, 3) if slope > 0 else None}
                    result["fits"].append(fit)
                    print(f"  fit N={n} pdl={int(pdl)} {kind}: fixed {fit['fixed_us']:.2f} µs a call, "
                          f"streaming at {fit['stream_tb_s']} TB/s")
    finally:
        uniform_cuda.set_dependent_launch(bool(before))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
