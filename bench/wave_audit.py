"""Which launches lose a wave of blocks to their registers, without a GPU: the registers ptxas gave each mma kernel
(``bench/sass_local.sh`` output, one file a translation unit) against the launch rules' picks (``launch_config`` on a
132-SM H200) at M = 1, 4, 8, 16 on the kernel table's shapes. A row is flagged where fewer registers would add a block
an SM and save a wave (registers are allocated in steps of 8 a thread; 64 K a SM).

    for tu in mma_int4 mma_int3 mma_int2 mma_e2m1; do OUT_DIR=/tmp/sass_$tu bash bench/sass_local.sh $tu x \\
        > /tmp/sass_$tu.txt; done
    python bench/wave_audit.py /tmp/sass_mma_{int4,int3,int2,e2m1}.txt

The instantiation a launch runs is worked out here as ``launch_mma`` picks it (csrc/uniform_mma.cuh, with its
switches at their defaults): keep the two in step when that choice changes.

``--over``: every row above one wave too, flagged or not — candidates for launches of fewer warps a block that fit
one wave at the same registers (the fortieth session's ``bench/onewave_session.sh`` timed them: W4 at M = 9..16 on
28672 × 8192 won by 3-5 %, W2 bf16 there at M = 7, 8 by 1-4 %; W3, and W2 at M ≤ 6, kept their picks).
"""
from __future__ import annotations

import argparse
import math
import os
import re
from unittest import mock

import torch

from llmcomp.kernels import uniform_cuda as uc

SMS = 132
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (28672, 8192), (6144, 4096), (28672, 4096)]
FORMATS = [("W4", 4, 3), ("W3", 3, 8), ("W2", 2, 3), ("E2M1", 4, 1)]  # (name, bits, the kernel's ELEM)
LINE = re.compile(r"(\d+) regs (\d+) bytes spill stores\s+void llmcomp_mma::(uniform_mma_kernel\w*)<([^>]*)>")


def registers(paths) -> dict:
    """{(kernel, template arguments): (registers, spill bytes)} from sass_local.sh outputs."""
    out = {}
    for path in paths:
        for line in open(path):
            m = LINE.match(line)
            if m:
                args = m.group(4).replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
                out[(m.group(3), args)] = (int(m.group(1)), int(m.group(2)))
    return out


def instantiation(t: str, bits: int, elem: int, m: int, launch: tuple, n: int, norm: bool) -> tuple[str, str]:
    """(kernel, template arguments) that ``launch_mma`` runs for this call (post-scale weights, lean on)."""
    rt, warps, wr = launch
    lay, mt = (2 if bits == 3 else bits), (1 if m <= 8 else 2)
    r = 2 if rt >= 2 and n % 32 == 0 else 1
    u = 2 if r == 2 and mt == 1 else 4
    threads = warps * wr * 32
    th = 512 if threads > 256 else 256
    b = {True: "true", False: "false"}
    if elem == 8:  # bound7: fp16 and the norm epilogue at one tile x 4 warps
        if threads == 128 and r == 1 and (norm or t == "fp16"):
            return "uniform_mma_kernel_bounded", f"{t}, {lay}, 1, 1, 4, 128, 8, {b[norm]}, false, false, 7"
        return "uniform_mma_kernel", f"{t}, {lay}, {mt}, {r}, {u}, {th}, 8, false, {b[norm]}, false, false"
    if elem == 3:  # lean; 4-bit codes load their scales early at M <= 8 and at two token and row tiles
        se = lay == 4 and (mt == 1 or r == 2)
        if mt == 1 and r == 2 and threads == 128 and (lay == 2 or t == "fp16"):  # bound7_r2
            return "uniform_mma_kernel_bounded", f"{t}, {lay}, 1, 2, 2, 128, 3, {b[norm]}, true, {b[se]}, 7"
        return "uniform_mma_kernel", f"{t}, {lay}, {mt}, {r}, {u}, {th}, 3, false, {b[norm]}, true, {b[se]}"
    lean = mt == 1 and threads <= 256  # E2M1
    return "uniform_mma_kernel", f"{t}, {lay}, {mt}, {r}, {u}, {th}, 1, false, false, {b[lean]}, false"


def blocks_an_sm(regs: int, threads: int) -> int:
    return min(65536 // (-(-regs // 8) * 8 * threads), 32, 2048 // threads)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sass", nargs="+", help="bench/sass_local.sh outputs")
    ap.add_argument("--all", action="store_true", help="every row, not only the flagged ones")
    ap.add_argument("--over", action="store_true", help="the rows above one wave too")
    args = ap.parse_args()
    missing = [p for p in args.sass if not os.path.isfile(p)]
    if missing:  # (a FileNotFoundError traceback)
        ap.error(f"no such file: {', '.join(missing)} (bench/sass_local.sh writes them)")
    regs, show_all = registers(args.sass), args.all
    props = mock.Mock(multi_processor_count=SMS)
    with mock.patch.object(torch.cuda, "get_device_properties", return_value=props), \
            mock.patch.object(torch.cuda, "current_device", return_value=0):
        for name, bits, elem in FORMATS:
            for t in ("bf16", "fp16"):
                for n, k in SHAPES:
                    for m in (1, 4, 8, 16):
                        if m > 8 and elem in (8, 1):  # (3-bit post-scale and E2M1's lean kernels: M <= 8)
                            continue
                        launch = uc.launch_config(n, k, bits, m, elem=1 if elem == 1 else 0, post=elem != 1,
                                                  fp16=t == "fp16")
                        for norm in ((False, True) if m <= 8 and elem != 1 else (False,)):
                            kern = instantiation(t, bits, elem, m, launch, n, norm)
                            if kern not in regs:
                                print(f"{name} {t} {n}x{k} M={m} {launch}: no registers for {kern}")
                                continue
                            r, spill = regs[kern]
                            threads = launch[1] * launch[2] * 32
                            per_sm = blocks_an_sm(r, threads)
                            rows = 2 if launch[0] >= 2 and n % 32 == 0 else 1
                            blocks = -(-(n // (16 * rows)) // launch[2])
                            waves = blocks / (per_sm * SMS)
                            fewer = next((x for x in range(r - 1, 31, -1) if blocks_an_sm(x, threads) > per_sm), None)
                            flag = fewer is not None and math.ceil(blocks / (blocks_an_sm(fewer, threads) * SMS)) \
                                < math.ceil(waves)
                            if flag or show_all or (args.over and waves > 1):
                                note = f"  <- {fewer} would save a wave" if flag else ""
                                print(f"{name} {t} {n}x{k} M={m} {'norm' if norm else 'plain'} {launch} {r} registers"
                                      f"{f' ({spill} B spill)' if spill else ''}, {per_sm} blocks an SM, {blocks} "
                                      f"blocks, {waves:.2f} waves{note}")


if __name__ == "__main__":
    main()
