"""PVQ quantization time per layer at the bundled model's shapes (issue 6: PVQ on an H200 was slower than
on one CPU thread: the greedy projection ran ~20 tiny kernels a pulse, ~29 pulses a column, per column).
Random weights, Hessians of correlated random inputs; prints seconds per layer shape and the estimate for
the 30 decoder layers of SmolLM2-135M (q, o: 576×576; k, v: 192×576; gate, up: 1536×576; down: 576×1536).

    OMP_NUM_THREADS=1 python bench/pvq_speed.py [--device cuda] [--bits 2] [--out rows.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from llmcomp.core import memory
from llmcomp.core.paths import write_json
from llmcomp.quant.hessian import HessianAccumulator
from llmcomp.quant.pvq import PVQConfig, PVQQuantizer, pyramid_for_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

SHAPES = {"q/o": ((576, 576), 2), "k/v": ((192, 576), 2), "gate/up": ((1536, 576), 2), "down": ((576, 1536), 1)}
N_LAYERS = 30


def layer(out_f: int, in_f: int, device: str):
    g = torch.Generator().manual_seed(out_f * 7 + in_f)
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = torch.randn(out_f, in_f, generator=g) * 0.02
    X = torch.randn(2048, in_f, generator=g) @ (torch.eye(in_f) + 0.1 * torch.randn(in_f, in_f, generator=g))
    acc = HessianAccumulator(in_f)
    acc.add(X.to(device))
    return lin.to(device), acc


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=_cli.number(0, above=True), default=2)  # (nan ran, with some pyramid)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    _cli.check(ap, memory.check_device, args.device)
    _cli.writable(ap, args.out)
    torch.set_num_threads(1)
    q = PVQQuantizer(PVQConfig(format=_cli.check(ap, pyramid_for_bits, args.bits, rotate=True)))
    rows, total = [], 0.0
    for name, ((out_f, in_f), per_layer) in SHAPES.items():
        lin, acc = layer(out_f, in_f, args.device)
        sync(args.device)
        t = time.perf_counter()
        res = q.quantize_linear(name, lin, acc)
        sync(args.device)
        dt = time.perf_counter() - t
        total += dt * per_layer * N_LAYERS
        rows.append({"shape": [out_f, in_f], "name": name, "seconds": round(dt, 3), **res.metrics})
        print(f"{name:8s} {out_f}x{in_f}: {dt:.2f} s  {res.metrics}", flush=True)
    print(f"estimate for {N_LAYERS} decoder layers on {args.device}: {total:.0f} s", flush=True)
    if args.out:
        write_json(args.out, {"device": args.device, "bits": args.bits, "rows": rows,
                              "model_estimate_s": round(total)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
