"""A/B of codebook (VQ) siblings at one row of x, in one process: Llama-3-8B's q / k / v (4096, 1024, 1024 × 4096)
and gate / up (2 × 14336 × 4096), random indices and codebooks, each weight its own codebook — every member's own
``frozen_forward`` (the lookup-table GEMV from ``LUT_MIN_WEIGHTS``, the mma kernel below: k and v) against
``qlinear.frozen_group`` (one grouped GEMV launch, ``codebook_cuda.fuse``). Timed as ``llmcomp bench kernels`` times
layers: copies of the group back to back in one CUDA graph, so every call reads its weights from HBM; µs a group
and % of the group's byte roofline at the copy bandwidth measured in the same run; also records how far the two
outputs differ on the first copy (``max_rel_diff``, of the largest value: k and v leave the mma kernel's bf16
codebook for the GEMV's fp32 table) and stops if it is over 1 %.

    python bench/vq_group_ab.py --out bench/results/kernels_h200_vq_group.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llmcomp.core.memory import state_bytes
from llmcomp.core.qlinear import QuantLinear, frozen_group
from llmcomp.eval import kernel_bench as kb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

GROUPS = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "gate_up": [(14336, 4096), (14336, 4096)]}


def _members(name: str, shapes: list, seed: int) -> tuple[list[QuantLinear], int]:
    """One group's QuantLinears (each with its own random codebook) and their bytes."""
    fmt = kb.codebook_format(name)
    mods, nbytes = [], 0
    for i, (n, k) in enumerate(shapes):
        t = kb.random_codebook(fmt, n, k, seed + i, "cuda")
        nbytes += state_bytes(t)
        mods.append(QuantLinear.from_packed(fmt, t, k))
    return mods, nbytes


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--formats", type=_cli.names(kb.CODEBOOK_FORMATS), default="vq2,vq3")
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    dtype = torch.bfloat16
    bw = kb.copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw, "rows": []}
    with torch.no_grad():
        for name in args.formats:
            for group, shapes in GROUPS.items():
                n, k = sum(s[0] for s in shapes), shapes[0][1]
                first, nbytes = _members(name, shapes, 1)
                sets = [first] + [_members(name, shapes, 1 + 10 * c)[0] for c in range(1, kb._copies(nbytes))]
                x = torch.randn(1, k, device="cuda", dtype=dtype)
                own = [[m.frozen_forward(dtype) for m in mods] for mods in sets]
                grouped = [frozen_group(mods, dtype) for mods in sets]
                if any(f is None for fs in own for f in fs) or any(g is None for g in grouped):
                    raise SystemExit(f"{name} {group}: no frozen forward or no group (is the CUDA extension built?)")
                row = {"format": name, "group": group, "N": n, "K": k, "M": 1, "members": len(shapes)}
                a = torch.cat([f(x) for f in own[0]], -1).float()
                b = torch.cat([f(x) for f in grouped[0]], -1).float()
                row["max_rel_diff"] = round(float((a - b).abs().max() / a.abs().max()), 6)
                if row["max_rel_diff"] > 0.01:
                    raise SystemExit(f"{name} {group}: the group differs from its members by {row['max_rel_diff']}")
                kb._time_into(row, "own", [lambda fs=fs: [f(x) for f in fs] for fs in own], nbytes, bw)
                kb._time_into(row, "group", [lambda fs=fs: [f(x) for f in fs] for fs in grouped], nbytes, bw)
                row["group_vs_own"] = round(row["own_us"] / row["group_us"], 3)
                result["rows"].append(row)
                print(row, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
                del sets, own, grouped, first
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
