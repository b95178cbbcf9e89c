"""Registers and instruction placement of the split-KV decode attention's partial kernel for sm_90, without a GPU.

Triton compiles for a target it is told (``triton.compile`` on an ``ASTSource`` with ``GPUTarget("cuda", 90, 32)``),
with the pointer and stride arguments marked divisible by 16 as a real launch specializes them (without that the
K/V loads come out as 2-byte loads). The cubin is disassembled by ``cuobjdump`` (``bench/sass_local.sh`` fetches it
into $SASS_TOOLS). Printed: registers, instruction count, and the order of the global loads, barriers, tensor-core
ops and stores — e.g. whether a block's K/V loads issue before or after the rotary embedding's math (``ROPE``).

    python bench/triton_sass.py --rope 0 1 [--groups 4 --d 128 --chunk 64 --mask 1 --stages 3]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

PTRS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "m_ptr": "*u8", "acc_ptr": "*fp32", "ml_ptr": "*fp32",
        "cnt_ptr": "*i32", "out_ptr": "*bf16", "kn_ptr": "*bf16", "vn_ptr": "*bf16", "cos_ptr": "*bf16",
        "sin_ptr": "*bf16", "pos_ptr": "*i64"}
STRIDES = ("sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l", "sm_b", "skn_b", "skn_h", "svn_b",
           "svn_h", "scs_b")
SHOWN = ("LDG", "LDGSTS", "HMMA", "STG", "BAR", "ACQBULK", "FFMA", "F2FP", "ATOMG")


def compile_partial(const: dict, stages: int) -> bytes:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llmcomp.kernels import decode_attention as da

    partial, _ = da._kernels()
    names = partial.arg_names
    sig = {n: "constexpr" if n in const else PTRS.get(n, "fp32" if n == "scale" else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in PTRS or n in STRIDES}
    src = ASTSource(fn=partial, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
    return kernel.asm["cubin"]


def placement(sass: str) -> str:
    """Runs of the SHOWN instructions in program order: NAME(count)@index."""
    out, last, count, at = [], None, 0, 0
    for i, line in enumerate(re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", sass)):
        op = line.split()[1 if line.startswith("@") else 0].split(".")[0]
        if op not in SHOWN:
            continue
        if op != last:
            if last:
                out.append(f"{last}({count})@{at}")
            last, count, at = op, 0, i
        count += 1
    return " ".join(out + ([f"{last}({count})@{at}"] if last else []))


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rope", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    ap.add_argument("--groups", type=_cli.count(1), default=4)
    ap.add_argument("--d", type=_cli.count(16), default=128)
    ap.add_argument("--chunk", type=_cli.count(16), default=64)
    ap.add_argument("--mask", type=int, default=1, choices=(0, 1))
    ap.add_argument("--stages", type=_cli.count(1), default=3)
    args = ap.parse_args()
    _cli.needs_triton(ap)  # (no GPU needed: it compiles for sm_90)
    tools = Path(os.environ.get("SASS_TOOLS", Path.home() / ".cache/llmcomp/sass-tools")) / "bin"
    for rope in args.rope:
        const = dict(GROUPS=args.groups, GP=max(16, 1 << (args.groups - 1).bit_length()), D=args.d,
                     BLOCK=min(args.chunk, 64), CHUNK=args.chunk, MASK=args.mask, MERGE=0, SP=16, PDL=1, ROPE=rope)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compile_partial(const, args.stages))
            run = lambda *a: subprocess.run([str(tools / "cuobjdump"), *a, str(cubin)], capture_output=True,  # noqa
                                            text=True, env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"})
            regs = re.search(r"REG:(\d+)", run("--dump-resource-usage").stdout)
            sass = run("-sass").stdout
        n = len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))
        print(f"ROPE {rope}: {regs.group(1) if regs else '?'} registers, {n} instructions")
        print("  " + placement(sass))


if __name__ == "__main__":
    main()
