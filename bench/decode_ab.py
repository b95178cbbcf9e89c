"""A/B of decode-step settings in one process: the 8B-shaped random model built once, each variant timed with the
decoder layers compiled (``decode_bench.run``, CUDA graphs), bf16 variants first, then the same model RTN W4 g128.

    python bench/decode_ab.py --out bench/results/decode_h200_ab.json [--layers 32] [--batch 1,16]

A variant: the decode attention (``LLMCOMP_DECODE_ATTENTION``: triton = the split-KV kernel, torch = two GEMMs at
batch 1 / SDPA above) and, for W4, dependent launch of the GEMMs on or off (``uniform_cuda.set_dependent_launch``;
graphs are captured per run, so each run gets its setting) and q/k/v, gate/up stacked into one call each or not
(``compiled_layers(fuse=...)``), and inductor's own PDL for its Triton kernels on or off
(``torch._inductor.config.triton.enable_pdl``, where this torch has it: with both on, every kernel of the step
could start early), and the fp32 post-scale kernel at batch <= 8 on or off (``uniform_cuda.set_post_scale``). Each
variant's rows land in the JSON as they finish.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from llmcomp.eval import decode_bench as db
from llmcomp.kernels import uniform_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

BF16 = [("triton", None), ("torch", None)]
W4 = ["triton:0:1", "triton:0:0", "triton:1:1", "torch:0:1"]  # attention:pdl:fuse[:inductor pdl[:post-scale]]


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=_cli.count(1), default=None)
    ap.add_argument("--batch", type=_cli.ints(1, "1,16"), default="1,16")
    ap.add_argument("--context", type=_cli.count(1), default=512)
    ap.add_argument("--steps", type=_cli.count(1), default=64)
    ap.add_argument("--w4", default=",".join(W4),
                    help="attention:pdl:fuse[:inductor_pdl[:post-scale]] (0/1), comma-separated")
    ap.add_argument("--bf16", default=",".join(a for a, _ in BF16))
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    batches = list(args.batch)
    result = {**db.environment(), "layers": args.layers, "context": args.context, "steps": args.steps, "runs": []}

    def timed(label: str, name: str, model, attention: str, pdl, fuse: bool = True, inductor_pdl: bool = False,
              post: str = "1"):
        import torch._inductor.config as inductor

        os.environ["LLMCOMP_DECODE_ATTENTION"] = attention
        state = uniform_cuda.set_dependent_launch(pdl) if pdl is not None else None
        uniform_cuda.set_post_scale(post == "1")
        has = hasattr(inductor.triton, "enable_pdl")  # inductor's own PDL for its Triton kernels (newer torch)
        if has:
            inductor.triton.enable_pdl = inductor_pdl
        t = time.perf_counter()
        r = db.run([(name, label, model)], batches, args.context, args.steps, {"synthetic": "llama3-8b"},
                   compile=True, fuse=fuse)
        run = {"model": name, "attention": attention, "dependent_launch": state, "fuse": fuse, "post_scale": post,
               "inductor_pdl": inductor_pdl if has else None,
               "inductor_options": r["settings"].get("inductor_options"),  # (combo kernels by default since 8c3ed27)
               "seconds": round(time.perf_counter() - t, 1), "rows": r["rows"]}
        result["runs"].append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        for row in r["rows"]:
            print(f"{label:>10} attention={attention:<6} pdl={state!s:<5} fuse={fuse:d} ipdl={run['inductor_pdl']} "
                  f"post={post} batch {row['batch']:>2}: "
                  f"{row.get('ms_per_step', row.get('error'))} ms/step ({run['seconds']} s)", flush=True)

    model = db.synthetic_model("llama3-8b", args.layers, dtype=torch.bfloat16)
    for attention in filter(None, args.bf16.split(",")):
        timed("bf16", "original", model, attention, None)
    db.quantize_rtn(model, 4, 128)
    for spec in filter(None, args.w4.split(",")):
        attention, pdl, fuse, *rest = spec.split(":")
        ipdl, post = (rest + ["0", "1"][len(rest):])[:2]
        timed("W4 g128", "compressed", model, attention, pdl == "1", fuse == "1", ipdl == "1", post)


if __name__ == "__main__":
    main()
