"""``llmcomp bench``: performance measurements that print ratios against peers timed in the same run."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.errors import UserError

bench_app = typer.Typer(help="Benchmarks: kernels vs peers (GPU).", no_args_is_help=True)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}.") from None


@bench_app.command("kernels")
def kernels(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the JSON result here.")] = None,
    shapes: Annotated[Optional[str], typer.Option(help="Layer shapes N×K, e.g. 4096x4096,14336x4096.")] = None,
    ms: Annotated[str, typer.Option("--ms", help="Batch sizes M.")] = "1,4,16,64,256",
    bits: Annotated[str, typer.Option(help="Bit widths of the uniform format.")] = "4",
    group_size: Annotated[int, typer.Option(help="Group size.")] = 128,
):
    """Time the dequant-GEMM fast paths against bf16 cuBLAS, torch's int4 tinygemm and bitsandbytes NF4."""
    from llmcomp.cli.app import run

    def go():
        try:
            parsed = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",")] if shapes else None
        except ValueError:
            raise UserError(f"--shapes must look like 4096x4096,14336x4096, got {shapes!r}.") from None
        if parsed is not None and any(len(s) != 2 for s in parsed):
            raise UserError(f"--shapes must look like 4096x4096,14336x4096, got {shapes!r}.")
        m_list, bit_list = _ints(ms, "--ms"), tuple(_ints(bits, "--bits"))
        import torch

        if not torch.cuda.is_available():
            raise UserError("llmcomp bench kernels needs a CUDA GPU; none is visible to torch here.")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UserError("llmcomp bench kernels times with triton.testing; install triton.") from None
        from llmcomp.eval import kernel_bench

        kernel_bench.run(parsed or kernel_bench.SHAPES, m_list, bit_list, group_size, out)

    run(go)
