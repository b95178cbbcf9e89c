"""Codebook kernel launch sweep with the bank-replicated table (16 copies) and with one table, in one process:
which (warps splitting K, row groups a block) each wants, and whether the choice of copies should depend on the
launch. Writes JSON after each shape (a timeout loses one shape, not the file).

    python bench/vq_rep_sweep.py --out OUT.json --fmt vq2 --ms 1,16 --shapes 14336x4096,28672x8192
"""
import argparse
import sys
from pathlib import Path

import torch

from llmcomp.core.paths import write_json
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import codebook_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

SPLITS = ((4, 1), (8, 1), (16, 1), (4, 2), (8, 2), (4, 4), (2, 8), (2, 4))


@_cli.one_line_errors
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fmt", default="vq2", choices=kb.CODEBOOK_FORMATS)
    ap.add_argument("--ms", type=_cli.ints(1, "1,16"), default="1,16")
    ap.add_argument("--shapes", type=_cli.shapes(), default="14336x4096,28672x8192,4096x14336,4096x4096")
    a = ap.parse_args()
    _cli.writable(ap, a.out)
    _cli.needs_cuda(ap)
    bw = kb.copy_bandwidth()
    rows = []
    for n, k in a.shapes:
        nbytes, preps, _, auto = kb._sweep_subject(a.fmt, n, k, 2, 128)
        for m in a.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for p in preps:
                codebook_cuda.gemm(x, p)
            best = {}
            for rep in (True, False):
                for warps, wr in SPLITS:
                    t = kb.per_call_seconds([lambda p=p: codebook_cuda.gemm(x, p, (warps, wr), rep) for p in preps])
                    pct = kb.roofline_pct(nbytes, m, n, k, bw, t)
                    rows.append({"format": a.fmt, "N": n, "K": k, "M": m, "copies": 16 if rep else 1,
                                 "warps": warps, "wr": wr, "us": round(t * 1e6, 3), "roofline_pct": round(pct, 2)})
                    if rep not in best or t < best[rep][0]:
                        best[rep] = (t, (warps, wr))
            print(f"vqsweep {a.fmt} {n}x{k} M={m}: 16 copies best {best[True][1]} {best[True][0] * 1e6:.2f}us, "
                  f"1 copy best {best[False][1]} {best[False][0] * 1e6:.2f}us (launch_config {auto(m, x.dtype)})",
                  flush=True)
        del preps
        write_json(a.out, rows, partial=True)  # (a timeout loses one shape, not the file)
    write_json(a.out, rows)


if __name__ == "__main__":
    main()
