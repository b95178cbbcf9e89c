"""Does a refusal of the CUDA extension's ``gemm`` reach Python as a RuntimeError on this machine?

    python3 -X faulthandler bench/ext_probe.py K N     (on the GPU machine)

Calls ``llmcomp::uniform_mma_gemm`` with x [1, K] and zero codes/scales for N rows (W4, groups of 128) and prints
the RuntimeError's first line, or NO ERROR. K not a multiple of 64 or N not of 16 must be refused ("shape not
supported"). Run it in its own process: the one formatted TORCH_CHECK message the extension once had ended the
process with a segmentation fault on the H200 (bench/results/kernels_h200_notes.md, the fifteenth session)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


@_cli.one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("k", type=_cli.count(1), metavar="K", help="x's columns")
    ap.add_argument("n", type=_cli.count(1), metavar="N", help="the weight's rows")
    args = ap.parse_args(argv)  # (it read sys.argv[1] and [2] as ints: --help and a missing N were tracebacks)
    _cli.needs_cuda(ap, "calls the CUDA extension")
    import torch

    from llmcomp.kernels import uniform_cuda as u

    k, n = args.k, args.n
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    q = torch.zeros(n, 8, dtype=torch.int32, device="cuda")
    sz = torch.zeros(n, 11, dtype=torch.int32, device="cuda")
    try:
        u.gemm_op(x, q, q, sz, 4, 128, n, 1, 8, 0, 1)
        print(k, n, "NO ERROR")
    except RuntimeError as e:
        print(k, n, "RuntimeError:", str(e).splitlines()[0])


if __name__ == "__main__":
    main()
