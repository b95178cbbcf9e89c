"""A/B of a kernel setting in one process, W4 g128 GEMMs (``--bits``, ``--format``; bf16 activations):
``--knob pdl`` dependent launch (PDL) off / on (``uniform_cuda.set_dependent_launch``), ``--knob post`` up to how
many rows of x the fp32 post-scale kernel serves (``uniform_cuda.set_post_scale``: ``16``, ``8``, or ``0``: the
per-pair-scale kernel always), ``--knob lean`` the post-scale kernels' lean instantiations (M ≤ 16) off / on
(``uniform_cuda.set_lean``), ``--knob e2m1`` the E2M1 kernels' lean loop at M ≤ 8 off / on
(``uniform_cuda.set_e2m1_lean``; with ``--format mxfp4|nvfp4``), ``--knob w3lean`` the 3-bit post-scale kernels' lean
loop off / on (``uniform_cuda.set_w3_lean``; with ``--bits 3``), ``--knob pair`` the early-scale kernels scaling a pair
of kblocks at once off / on (``uniform_cuda.set_scale_pair``):

1. the kernel-table shapes (and the stacked q/k/v and gate/up shapes of ``--fuse-linears``) at each M, timed as
   ``llmcomp bench kernels`` times them (copies of one layer back to back in a CUDA graph);
2. the seven linears of an 8B decoder layer (q, k, v, o, gate, up, down) in their decode order, over enough layer
   copies that every weight comes from HBM — the quantized part of a decode step — against bf16 cuBLAS on the
   same chain; % of the chain's byte roofline at the copy bandwidth measured in the same run; and the same layer
   with q/k/v and gate/up stacked (four GEMMs, as ``bench decode --fuse-linears`` runs them).

    python bench/kernel_ab.py --out bench/results/kernels_h200_pdl.json                # PDL, M = 1 and 16
    python bench/kernel_ab.py --knob post --ms 1,4 --out bench/results/kernels_h200_post.json
    python bench/kernel_ab.py --knob e2m1 --format mxfp4 --ms 1,8 --out bench/results/kernels_h200_e2m1_lean.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcomp.core.memory import state_bytes
from llmcomp.core.qlinear import QuantLinear
from llmcomp.eval import kernel_bench as kb
from llmcomp.formats import Uniform
from llmcomp.formats.fp4 import MXFP4, NVFP4
from llmcomp.kernels import uniform_cuda
from llmcomp.quant.fp4 import fp4_fields
from llmcomp.quant.rtn import rtn_fields

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

LAYER = [("q", 4096, 4096), ("k", 1024, 4096), ("v", 1024, 4096), ("o", 4096, 4096), ("gate", 14336, 4096),
         ("up", 14336, 4096), ("down", 4096, 14336)]
FUSED = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]  # --fuse-linears
STACKED = [(6144, 4096), (28672, 4096)]  # the stacked q/k/v and gate/up shapes
KNOBS = {"pdl": (["0", "1"], lambda v: uniform_cuda.set_dependent_launch(v == "1")),
         "post": (["16", "8", "0"], uniform_cuda.set_post_scale),
         "lean": (["0", "1"], lambda v: uniform_cuda.set_lean(v == "1")),
         "e2m1": (["0", "1"], lambda v: uniform_cuda.set_e2m1_lean(v == "1")),
         "w3lean": (["0", "1"], lambda v: uniform_cuda.set_w3_lean(v == "1")),
         "pair": (["0", "1"], lambda v: uniform_cuda.set_scale_pair(v == "1"))}
FORMATS = {"uniform": None, "mxfp4": MXFP4, "nvfp4": NVFP4}


def quantized(fmt, n: int, k: int, seed: int) -> tuple[QuantLinear, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    fields = rtn_fields(w, fmt) if fmt.name == "uniform" else fp4_fields(w, fmt)
    return QuantLinear.from_packed(fmt, fmt.pack(fields), k), w.to(torch.bfloat16)


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ms", type=_cli.ints(1, "1,16"), default="1,16")
    ap.add_argument("--chains-only", action="store_true", help="skip the single-shape rows")
    ap.add_argument("--no-chains", action="store_true", help="skip the decoder-layer chains")
    ap.add_argument("--knob", choices=sorted(KNOBS), default="pdl")
    ap.add_argument("--variants", default=None, help="the knob's settings, comma-separated (default: all)")
    ap.add_argument("--bits", type=int, default=4, help="uniform's bits")
    ap.add_argument("--format", choices=sorted(FORMATS), default="uniform")
    args = ap.parse_args()
    ms = list(args.ms)
    if (args.knob == "e2m1") != (args.format != "uniform"):
        ap.error("--knob e2m1 goes with --format mxfp4|nvfp4, the other knobs with uniform codes")
    bad = [v for v in args.variants.split(",") if v not in KNOBS[args.knob][0]] if args.variants else []
    if bad:  # (a setter's traceback, or a variant timed as another)
        ap.error(f"--variants {bad}: --knob {args.knob} takes {','.join(KNOBS[args.knob][0])}")
    uniform = args.format == "uniform"
    fmt = _cli.check(ap, Uniform, bits=args.bits, group_size=128) if uniform else FORMATS[args.format]()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    tag = f"w{args.bits}" if args.format == "uniform" else args.format  # (the chain rows' keys)
    bw = kb.copy_bandwidth()
    variants = args.variants.split(",") if args.variants else KNOBS[args.knob][0]
    setter = KNOBS[args.knob][1]
    before = (uniform_cuda.dependent_launch(), uniform_cuda.post_scale(), uniform_cuda.lean(),
              uniform_cuda.e2m1_lean(), uniform_cuda.w3_lean(), uniform_cuda.scale_pair())
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
              "knob": args.knob, "variants": variants, "format": fmt.describe(), "bits": args.bits, "shapes": [],
              "layer_chain": []}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    with torch.no_grad():  # (inference tensors have no version counter, which the layout cache keys on)
        for n, k in [] if args.chains_only else [*kb.SHAPES, *STACKED]:
            lay, _ = quantized(fmt, n, k, n + k)
            nbytes = state_bytes(lay.packed_tensors())
            layers = [lay] + [QuantLinear.from_packed(fmt, {a: t.clone() for a, t in lay.packed_tensors().items()}, k)
                              for _ in range(kb._copies(nbytes) - 1)]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"N": n, "K": k, "M": m}
                for v in variants:
                    setter(v)
                    kb._time_into(row, f"{args.knob}_{v}", [lambda lay=lay: lay(x) for lay in layers], nbytes, bw)
                row["speedup"] = {v: round(row[f"{args.knob}_{variants[0]}_us"] / row[f"{args.knob}_{v}_us"], 3)
                                  for v in variants[1:]}
                result["shapes"].append(row)
                print(row, flush=True)
                save()
            del layers
        torch.cuda.empty_cache()
        for label, linears in () if args.no_chains else (("separate", LAYER), ("fused", FUSED)):
            one = sum(state_bytes(quantized(fmt, n, k, 0)[0].packed_tensors()) for _, n, k in linears)
            copies = kb._copies(one)
            chain = [[quantized(fmt, n, k, 7 * c + i) for i, (_, n, k) in enumerate(linears)] for c in range(copies)]
            for m in ms:
                x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
                x2 = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)

                def step(layer, dense):
                    for (name, _, _), (q, w) in zip(linears, layer):
                        inp = x2 if name == "down" else x
                        F.linear(inp, w) if dense else q(inp)

                row = {"linears": label, "M": m, "layer_copies": copies, f"bytes_{tag}": one,
                       "bytes_bf16": sum(2 * n * k for _, n, k in linears)}
                for v in variants:
                    setter(v)
                    t = kb.per_call_seconds([lambda layer=layer: step(layer, False) for layer in chain])
                    row[f"{tag}_{args.knob}_{v}_us"] = round(t * 1e6, 2)
                    row[f"{tag}_{args.knob}_{v}_roofline_pct"] = round(100 * one / bw / t, 1)
                t = kb.per_call_seconds([lambda layer=layer: step(layer, True) for layer in chain])
                row["bf16_us"] = round(t * 1e6, 2)
                row["bf16_roofline_pct"] = round(100 * row["bytes_bf16"] / bw / t, 1)
                result["layer_chain"].append(row)
                print(row, flush=True)
                save()
            del chain
            torch.cuda.empty_cache()
    uniform_cuda.set_dependent_launch(bool(before[0]))
    uniform_cuda.set_post_scale(before[1])
    uniform_cuda.set_lean(bool(before[2]))
    uniform_cuda.set_e2m1_lean(bool(before[3]))
    uniform_cuda.set_w3_lean(bool(before[4]))
    uniform_cuda.set_scale_pair(bool(before[5]))


if __name__ == "__main__":
    main()
