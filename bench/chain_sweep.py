"""Launch configurations of the W4 decode GEMMs timed where they run: in the 8B decoder layer's chain at M = 1 with
dependent launch on, not alone.

``launch_config`` was set from sweeps of one kernel at a time (copies of one weight back to back). In the compiled
decode each GEMM follows a different kernel and, with dependent launch, starts during its tail; and the small ones
(q/k/v 6144 × 4096, o 4096 × 4096) stream at ~3.3 TB/s from HBM and from L2 alike (bench/fixed_cost.py), i.e. they
are bound by their warps' issue, not the bytes, so how many warps an SM holds matters. Here the layer's four calls
(q/k/v stacked, o, gate/up as the GLU call where the kernel has it, down) run in order over enough layer copies that
every weight comes from HBM; one position at a time takes each configuration (row tiles a warp, warps splitting K,
row groups a block) while the others keep ``launch_config``'s, and the chain's time per layer is recorded. The
default chain is timed before, between and after the positions (its spread is the noise), and last the chain with
every position's best.

    python bench/chain_sweep.py --out bench/results/chain_sweep_h200.json [--m 1]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llmcomp.eval import kernel_bench as kb
from llmcomp.formats import Uniform
from llmcomp.kernels import uniform_cuda
from llmcomp.quant.rtn import rtn_fields

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

POSITIONS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
SPLITS = [(w, r) for w in (2, 4, 8, 16) for r in (1, 2, 4, 8) if w * r <= 16]


def packed(fmt, n: int, k: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return fmt.pack(rtn_fields(torch.randn(n, k, device="cuda", generator=g) * 0.02, fmt))


def layer(fmt, seed: int, glu: bool) -> list[tuple]:
    """One decoder layer's four calls as (kernel arguments, glu flag, n, k)."""
    out = []
    for i, (name, n, k) in enumerate(POSITIONS):
        if name == "gate_up" and glu:
            call = uniform_cuda.glu(fmt, packed(fmt, n // 2, k, seed + 10 * i), packed(fmt, n // 2, k, seed + 10 * i + 1),
                                    k, torch.bfloat16)
            out.append((call.args, 1, n, k))
        else:
            prep = uniform_cuda.prepare(fmt, packed(fmt, n, k, seed + 10 * i), k)
            out.append((uniform_cuda.kernel_tensors(prep, torch.bfloat16), 0, n, k))
    return out


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--m", type=_cli.count(1), default=1)
    ap.add_argument("--no-pdl", action="store_true")
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    fmt = Uniform(bits=4, group_size=128)
    glu = hasattr(uniform_cuda, "glu")
    before = uniform_cuda.dependent_launch()
    uniform_cuda.set_dependent_launch(not args.no_pdl)
    one = layer(fmt, 0, glu)
    nbytes = sum(call[0][0].nbytes + call[0][2].nbytes for call in one)  # codes + scale pairs (4-bit: no high plane)
    copies = kb._copies(nbytes)
    chain = [one] + [layer(fmt, 100 * c, glu) for c in range(1, copies)]
    m = args.m
    xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in {k for _, _, k in POSITIONS}}
    defaults = [uniform_cuda.launch_config(n, k, 4, m, elem=one[i][0][7]) for i, (_, n, k) in enumerate(POSITIONS)]
    bw = kb.copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "M": m, "glu": glu,
              "pdl": not args.no_pdl, "layer_copies": copies, "bytes_per_layer": nbytes,
              "bytes_us": round(nbytes / bw * 1e6, 3), "defaults": [list(d) for d in defaults], "default_us": [],
              "rows": [], "best": None}

    def chain_us(configs) -> float:
        def step(lay):
            for (targs, g, _, k), c in zip(lay, configs):
                uniform_cuda.gemm_tensors(xs[k], *targs, launch=c, glu=g)
        return round(kb.per_call_seconds([lambda lay=lay: step(lay) for lay in chain]) * 1e6, 3)

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    try:
        result["default_us"].append(chain_us(defaults))
        print(f"M={m} pdl={int(not args.no_pdl)} glu={int(glu)} copies={copies} bytes {result['bytes_us']} µs; "
              f"defaults {defaults}: {result['default_us'][-1]} µs a layer", flush=True)
        best = list(defaults)
        for i, (name, n, k) in enumerate(POSITIONS):
            timed = []
            for rt in (1, 2):
                if n % (16 * rt):
                    continue
                for warps, wr in SPLITS:
                    configs = list(defaults)
                    configs[i] = (rt, warps, wr)
                    t = chain_us(configs)
                    timed.append((t, (rt, warps, wr)))
                    result["rows"].append({"position": name, "N": n, "K": k, "config": [rt, warps, wr], "us": t})
            timed.sort()
            best[i] = timed[0][1]
            result["default_us"].append(chain_us(defaults))
            print(f"{name} {n}x{k}: best {timed[0][1]} {timed[0][0]} µs, then {[(c, t) for t, c in timed[1:4]]}; "
                  f"default {defaults[i]}; default chain now {result['default_us'][-1]} µs", flush=True)
            save()
        result["best"] = {"configs": [list(c) for c in best], "us": chain_us(best)}
        result["default_us"].append(chain_us(defaults))
        print(f"every position's best {best}: {result['best']['us']} µs a layer; default chain "
              f"{result['default_us']} µs", flush=True)
        save()
    finally:
        uniform_cuda.set_dependent_launch(bool(before))


if __name__ == "__main__":
    main()
