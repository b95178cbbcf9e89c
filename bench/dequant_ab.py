"""A/B of the dequantize kernel's store staging (``uniform_cuda.set_dequant_stage``) in one process: for W4 / W3 / W2
g128, MXFP4 and NVFP4 on the kernel table's shapes, the dequantize kernel alone (% of its bytes: the packed weight
read, W written in bf16) and the prefill layer at M = ``--m`` (dequantize, then cuBLAS) against bf16 cuBLAS, each
setting timed twice in the order off, on, off, on (copies of the layer back to back in a CUDA graph, as
``llmcomp bench kernels`` times them).

    python bench/dequant_ab.py --out bench/results/dequant_stage_h200.json [--formats w4,mxfp4] [--m 256]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcomp.core.memory import state_bytes
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import uniform_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--formats", type=_cli.names(("w4", "w3", "w2", "mxfp4", "nvfp4")), default="w4,w3,w2,mxfp4,nvfp4")
    ap.add_argument("--shapes", type=_cli.shapes(), default=",".join(f"{n}x{k}" for n, k in kb.SHAPES))
    ap.add_argument("--m", type=_cli.count(1), default=256)
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    if uniform_cuda.extension() is None:
        raise SystemExit("the CUDA extension is not available here")
    shapes = args.shapes
    bw = kb.copy_bandwidth()
    before = uniform_cuda.dequant_stage()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
              "m": args.m, "rows": []}
    try:
        for name in args.formats:
            for n, k in shapes:
                fmt, base = kb._packed_for(name, n, k)
                nbytes = state_bytes(base)
                layers = kb._layer_copies(fmt, base, k, n)
                preps = [uniform_cuda.prepare(fmt, lay.packed_tensors(), k) for lay in layers]
                w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(kb._copies(n * k * 2))]
                x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
                row = {"format": name, "N": n, "K": k, "M": args.m}
                with torch.inference_mode():
                    kb._time_into(row, "bf16", [lambda w=w: F.linear(x, w) for w in w16], n * k * 2, bw)
                    for rnd in "ab":
                        for on in (False, True):
                            uniform_cuda.set_dequant_stage(on)
                            tag = f"{'stage' if on else 'plain'}_{rnd}"
                            kb._time_into(row, f"dequant_{tag}",
                                          [lambda p=p: uniform_cuda.dequantize(p, k, x.dtype) for p in preps],
                                          nbytes + n * k * 2, bw, gemm=False)
                            kb._time_into(row, f"layer_{tag}", [lambda lay=lay: lay(x) for lay in layers], nbytes, bw)
                result["rows"].append(row)
                print(f"{name:6s} {n:6d}x{k:<6d} bf16 {row['bf16_us']:8.2f}us  " + "  ".join(
                    f"{t}: dq {row[f'dequant_{t}_us']:7.2f}us {row[f'dequant_{t}_roofline_pct']:5.1f}% "
                    f"layer {row[f'layer_{t}_us']:7.2f}" for t in ("plain_a", "stage_a", "plain_b", "stage_b")),
                    flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
                del layers, preps, w16
                torch.cuda.empty_cache()
    finally:
        uniform_cuda.set_dequant_stage(bool(before))


if __name__ == "__main__":
    main()
