"""Whether a launch loses to a second wave of blocks: the uniform mma kernel at forced launches, each of its uses
(plain, the norm split's producer with the residual and γ, the GLU call as the norm's consumer), bf16 and fp16,
and each 4-warp launch with its register bound off and on (``uniform_cuda.set_bound7`` for 3-bit codes at one tile,
``set_bound7_r2`` for the others at two). Timed as ``llmcomp bench kernels`` times a layer (copies back to back in a
CUDA graph); one JSON row a point.

    python bench/wave_check.py --out bench/results/wave_check_h200.json                 # W3, 14336 and 28672 rows
    python bench/wave_check.py --bits 4 --shapes 28672x8192 --launches 2.4.1,2.8.1 --out ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llmcomp.core.paths import write_json
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import uniform_cuda as uc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def uses(x: torch.Tensor, n: int, g: torch.Generator) -> dict:
    """The kernel's uses on x [M, K] against a weight of n rows: name → call(kernel tensors, launch)."""
    m, k = x.shape
    res = torch.randn(m, n, device="cuda", generator=g).to(x.dtype)
    gamma = (torch.rand(n, device="cuda", generator=g) + 0.5).to(x.dtype)
    sq = torch.rand(m, k // 16, device="cuda", generator=g)
    return {"plain": lambda a, launch: uc.gemm_tensors(x, *a, launch=launch),
            "producer": lambda a, launch: uc.gemm_tensors(x, *a, launch=launch, res=res, gamma=gamma),
            "glu_consumer": lambda a, launch: uc.gemm_tensors(x, *a, launch=launch, glu=1, sq=sq, eps=1e-5)}


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bits", type=int, default=3, choices=(2, 3, 4), help="uniform codes' bits")
    ap.add_argument("--shapes", type=_cli.shapes(), default="14336x4096,28672x4096")
    ap.add_argument("--ms", type=_cli.ints(1, "1,16"), default="1")
    ap.add_argument("--launches", type=_cli.launches(), default="1.4.1,2.4.1,1.8.1",
                    help="rt.warps.wr, comma-separated")
    ap.add_argument("--dtypes", type=_cli.names(DTYPES), default="bf16,fp16")
    args = ap.parse_args()
    launches = args.launches
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    if uc.extension() is None:
        raise SystemExit("wave_check: the CUDA extension is unavailable here")
    bw = kb.copy_bandwidth()
    switch = "bound7" if args.bits == 3 else "bound7_r2"
    tiles = 1 if args.bits == 3 else 2  # the switch's launches: 4 warps, these row tiles a warp
    get, set_bound = getattr(uc, switch), getattr(uc, "set_" + switch)
    rows, before = [], get()
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw, "rows": rows}
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        for n, k in args.shapes:
            nbytes, preps, _, _ = kb._sweep_subject(f"W{args.bits}", n, k, args.bits, 128)  # g128, enough copies
            for dname in args.dtypes:
                tensors = [uc.kernel_tensors(p, DTYPES[dname]) for p in preps]
                for m in args.ms:
                    x = torch.randn(m, k, device="cuda", generator=g).to(DTYPES[dname])
                    for use, call in uses(x, n, g).items():
                        for launch in launches:
                            bounds = (False, True) if launch[1] * launch[2] == 4 and launch[0] == tiles else (False,)
                            for bound in bounds:
                                set_bound(bound)
                                t = kb.per_call_seconds([lambda a=a: call(a, launch) for a in tensors])
                                row = {"format": f"W{args.bits}", "N": n, "K": k, "M": m, "dtype": dname, "use": use,
                                       "launch": list(launch), switch: bound, "us": round(t * 1e6, 3),
                                       "roofline_pct": round(kb.roofline_pct(nbytes, m, n, k, bw, t), 2)}
                                rows.append(row)
                                print(f"W{args.bits} {n}x{k} M={m} {dname} {use:12s} {launch} {switch}={bound:d} "
                                      f"{row['us']:.2f} us {row['roofline_pct']:.1f} %", flush=True)
                                write_json(args.out, result, partial=True)
            del preps
        write_json(args.out, result)
    finally:
        set_bound(bool(before))


if __name__ == "__main__":
    main()
