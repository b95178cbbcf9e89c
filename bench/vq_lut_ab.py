"""A/B of the codebook (VQ) kernels at one row of x, in one process: the lookup-table GEMV (``csrc/vq_lut.cu``,
``codebook_cuda.set_lut(True, threads)``, ``--variants``: blocks of 512 and of 1024 threads, the PRMT-addressed
table) against the mma kernel (``set_lut(False)``) and the library's own choice (``auto``), all through
``QuantLinear`` as
``llmcomp bench kernels`` times them (copies of one layer back to back in a CUDA graph, random indices and
codebooks: ``vq2`` one 8-bit stage, ``vq3`` 8 + 4 bits), with bf16 cuBLAS on the same shape; % of each one's
byte roofline at the copy bandwidth measured in the same run.

    python bench/vq_lut_ab.py --out bench/results/kernels_h200_vq_lut.json
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
from llmcomp.kernels import codebook_cuda, uniform_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

STACKED = [(6144, 4096), (28672, 4096)]  # the stacked q/k/v and gate/up shapes of --fuse-linears


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--formats", type=_cli.names(kb.CODEBOOK_FORMATS), default="vq2,vq3")
    ap.add_argument("--shapes", type=_cli.shapes(allow_empty=True), default="",
                    help="N x K shapes instead of the bench's (e.g. 1024x4096,2048x4096)")
    ap.add_argument("--ms", type=_cli.ints(1, "1,16"), default="1")
    ap.add_argument("--variants", default="lut512,lut1024,mma",
                    help="lut / prmt (the table addressed by one PRMT a lookup) with a block size (512, 1024; none: "
                         "the default, 1024), mma (the mma kernel), auto (the defaults: kernel, block size, "
                         "addressing); a +pdl suffix: with dependent launch")
    args = ap.parse_args()
    for label in args.variants.split(","):
        base, *suffixes = label.split("+")
        if base.rstrip("0123456789") not in ("lut", "prmt", "mma", "auto") or set(suffixes) - {"pdl"}:
            ap.error(f"unknown variant {label!r}")
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    bw = kb.copy_bandwidth()
    pdl_before = bool(uniform_cuda.dependent_launch())
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw, "rows": []}
    with torch.no_grad():  # (not inference mode: the layout cache keys on version counters)
        for name in args.formats:
            for n, k in args.shapes or [*kb.SHAPES, *STACKED]:
                fmt, base = kb._packed_for(name, n, k)
                nbytes = state_bytes(base)
                layers = kb._layer_copies(fmt, base, k)
                dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(kb._copies(2 * n * k))]
                for m in args.ms:
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    row = {"format": name, "N": n, "K": k, "M": m}
                    for label in args.variants.split(","):
                        base, pdl = label.split("+")[0], "+pdl" in label
                        kind, threads = base.rstrip("0123456789"), int(base[len(base.rstrip("0123456789")):] or 0)
                        if kind == "auto":
                            codebook_cuda.set_lut(None)
                        else:
                            codebook_cuda.set_lut(kind != "mma", threads or None, force=True, prmt=kind == "prmt")
                        uniform_cuda.set_dependent_launch(pdl)
                        kb._time_into(row, label, [lambda lay=lay: lay(x) for lay in layers], nbytes, bw)
                    codebook_cuda.set_lut(None)
                    uniform_cuda.set_dependent_launch(pdl_before)
                    kb._time_into(row, "bf16", [lambda w=w: F.linear(x, w) for w in dense], 2 * n * k, bw)
                    for t in args.variants.split(","):
                        row[f"{t}_vs_bf16"] = round(row["bf16_us"] / row[f"{t}_us"], 3)
                    result["rows"].append(row)
                    print(row, flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=1))
                del layers, dense
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
