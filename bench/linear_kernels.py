"""Linear-attention core op on the GPU: torch reference forms vs our Triton recurrent kernel vs
flash-linear-attention (when installed), one run, JSON out.

    python bench/linear_kernels.py --out $OUT/linear_kernels.json [--seq 2048,8192] [--budget 80]

Shapes are a linearized SmolLM2-135M layer (9 heads, value dim 64 + the normaliser column) at batch 1;
feature dims 64 (Liger / GLA / Mamba: the head dimension) and 128 (Hedgehog: two softmax maps). Rows:
prefill forward at each length (torch: the chunked form, chunk 64, or 16 with per-feature gates as the
student uses), prefill forward+backward (training: torch chunked vs fla), and one decode step with a state
(torch recurrent vs Triton vs fla). Times from ``triton.testing.do_bench`` (median, ms). Rows stop when
``--budget`` seconds have passed (the JSON is written after every row).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

from llmcomp.linearize import kernels
from llmcomp.linearize.attention import chunk_linear_attention, recurrent_linear_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


def make(T, F, gate, B=1, H=9, D=65, grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(B, H, T, F).softmax(-1), r(B, H, T, F).softmax(-1), r(B, H, T, D)
    gg = {"none": None, "head": torch.nn.functional.logsigmoid(r(B, H, T) + 3),
          "feature": torch.nn.functional.logsigmoid(r(B, H, T, F) + 3) / 16}[gate]
    s0 = r(B, H, F, D)
    ts = [q, k, v, gg, s0]
    if grad:
        ts = [None if t is None else t.requires_grad_() for t in ts]
    return ts


@_cli.one_line_errors
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seq", type=_cli.ints(1, "2048,8192"), default="2048,8192")
    ap.add_argument("--budget", type=_cli.number(0, above=True), default=80.0)
    args = ap.parse_args(argv)
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap, "times the linear-attention kernels")
    _cli.needs_triton(ap)
    import triton.testing  # the GPU machine's (after argument parsing: --help works anywhere)

    t0 = time.perf_counter()
    rows = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "fla": kernels.fla_available(),
            "triton": __import__("triton").__version__}
    if meta["fla"]:
        import fla

        meta["fla_version"] = getattr(fla, "__version__", "?")

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def bench(fn):
        return round(triton.testing.do_bench(fn, warmup=10, rep=40), 4)

    def emit(row):
        rows.append(row)
        print(row, flush=True)
        save()

    def forward_row(row, T, F, gate, torch_core, fla_core):
        """Forward only: the torch form vs our Triton recurrent kernel vs fla, on the same inputs."""
        q, k, v, g, s0 = make(T, F, gate)
        with torch.no_grad():
            row["torch_ms"] = bench(lambda: torch_core(q, k, v, g, s0))
            row["triton_ms"] = bench(lambda: kernels.triton_recurrent(q, k, v, g, s0))
            if meta["fla"]:
                row["fla_ms"] = bench(lambda: fla_core(q, k, v, g, s0))
        emit(row)

    for gate in ("feature", "head", "none"):
        for F in (64, 128):
            chunk = 16 if gate == "feature" else 64
            chunked = functools.partial(chunk_linear_attention, chunk_size=chunk)
            forward_row({"kind": "decode step", "gate": gate, "F": F, "T": 1}, 1, F, gate,
                        recurrent_linear_attention, kernels.fla_recurrent)
            for T in args.seq:
                if time.perf_counter() - t0 > args.budget:
                    break
                forward_row({"kind": "prefill fwd", "gate": gate, "F": F, "T": T, "torch_chunk": chunk}, T, F, gate,
                            chunked, kernels.fla_chunk)
                if meta["fla"]:
                    leaves = make(T, F, gate, grad=True)

                    def step(core):
                        o, s = core(*leaves[:4], initial_state=leaves[4])
                        (o.sum() + s.sum()).backward()

                    emit({"kind": "prefill fwd+bwd", "gate": gate, "F": F, "T": T, "torch_chunk": chunk,
                          "torch_ms": bench(lambda: step(chunked)), "fla_ms": bench(lambda: step(kernels.fla_chunk))})
        if time.perf_counter() - t0 > args.budget:
            break
    save()


if __name__ == "__main__":
    main()
