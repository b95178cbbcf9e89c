"""Prefill above M = 64 (dequantize, then cuBLAS) split into row chunks, an experiment (forty-second session; run in
the forty-third: small gains on 28672 x 8192 only, not built into the layer; prefill_chunks_*_h200_s43.json). At
M = 256 cuBLAS on the bf16 weight is compute-bound on an H200 (~590 TFLOP/s on 28672 x 8192) and the
dequantize kernel is memory-bound (84-92 % of its bytes since its stores were staged), so run one after the other
they add up (W4 layer 0.58-0.66x bf16). Here the weight's rows are cut into ``chunks`` pieces: each piece is
dequantized (the kernel layout's row tiles and scale rows are contiguous slices), then multiplied — in order on one
stream (``seq``), and with the next piece's dequantize on a second stream while cuBLAS works on this one
(``streams``: cuBLAS on N / chunks rows may leave SMs free for it). Timed against bf16 cuBLAS and the one-piece
layer, each graph-replayed over copies of the weight (``llmcomp bench kernels``' timing); each row keeps the chunked
output's largest difference from the one-piece layer's, relative to its largest value.

    python bench/prefill_chunks.py --out bench/results/prefill_chunks_h200.json [--format w4|mxfp4] [--ms 256,1024]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import uniform_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

def _slices(prep: dict, dtype: torch.dtype, chunks: int) -> list[tuple]:
    """Per piece: (qw, qh, sz, rows) — row tiles of the kernel layout and the matching scale rows."""
    n = prep["n"]
    tiles = n // 16
    step = -(-tiles // chunks)
    sz = uniform_cuda.scale_pairs(prep, dtype)
    qh = prep["qh"]
    out = []
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        out.append((prep["qw"][t0:t1], (qh[t0:t1] if qh is not None else prep["qw"][t0:t1]), sz[16 * t0:16 * t1],
                    16 * (t1 - t0)))
    return out


def chunked(x: torch.Tensor, prep: dict, k: int, pieces: list[tuple], side: torch.cuda.Stream | None):
    """y [M, N] through the pieces; with ``side`` each piece's dequantize on that stream one piece ahead."""
    ext = uniform_cuda.extension()
    dtype = x.dtype
    elem = uniform_cuda.kernel_elem(prep, dtype)
    yt = torch.empty(prep["n"], x.shape[0], device=x.device, dtype=dtype)  # y transposed: each piece's rows contiguous
    xt = x.t()

    def deq(p):
        return ext.dequant(p[0], p[1], p[2], prep["bits"], prep["group"], p[3], prep["kp"], dtype, elem)

    r0 = 0
    if side is None:
        for p in pieces:
            torch.mm(deq(p)[:, :k], xt, out=yt[r0:r0 + p[3]])
            r0 += p[3]
        return yt.t()
    # (the pieces stay referenced until both streams have joined, instead of record_stream inside a graph capture)
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        held = [deq(pieces[0])]
    for i, p in enumerate(pieces):
        main.wait_stream(side)
        if i + 1 < len(pieces):
            with torch.cuda.stream(side):
                held.append(deq(pieces[i + 1]))
        torch.mm(held[i][:, :k], xt, out=yt[r0:r0 + p[3]])
        r0 += p[3]
    side.wait_stream(main)  # joined back before the graph ends
    main.wait_stream(side)
    del held
    return yt.t()


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--format", default="w4", choices=("w4", "w3", "w2", "mxfp4", "nvfp4"),
                    help="w4 / w3 / w2 (g128) or mxfp4 / nvfp4")
    ap.add_argument("--shapes", type=_cli.shapes(), default=",".join(f"{n}x{k}" for n, k in kb.SHAPES))
    ap.add_argument("--ms", type=_cli.ints(1, "256,1024"), default="256,1024")
    ap.add_argument("--chunks", type=_cli.ints(1, "1,2,4,8"), default="1,2,4,8",
                    help="1: the chunked path's own one-piece control (W x^T)")
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    if uniform_cuda.extension() is None:
        raise SystemExit("the CUDA extension is not available here")
    shapes = args.shapes
    bw = kb.copy_bandwidth()
    side = torch.cuda.Stream()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
              "format": args.format, "rows": []}
    for n, k in shapes:
        fmt, base = kb._packed_for(args.format, n, k)
        layers = kb._layer_copies(fmt, base, k, n)
        preps = [uniform_cuda.prepare(fmt, lay.packed_tensors(), k) for lay in layers]
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(kb._copies(n * k * 2))]
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m}
            with torch.inference_mode():
                want = layers[0](x)
                row["bf16_us"] = round(kb.per_call_seconds([lambda w=w: F.linear(x, w) for w in w16]) * 1e6, 3)
                row["layer_us"] = round(kb.per_call_seconds([lambda lay=lay: lay(x) for lay in layers]) * 1e6, 3)
                for c in args.chunks:
                    pieces = [_slices(p, x.dtype, c) for p in preps]
                    for tag, st in (("seq", None), ("streams", side)):
                        got = chunked(x, preps[0], k, pieces[0], st)
                        torch.cuda.synchronize()
                        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
                        row[f"chunks{c}_{tag}_rel_err"] = round(float(err), 6)  # cuBLAS may sum in another order
                        t = kb.per_call_seconds([lambda p=p, q=q: chunked(x, p, k, q, st)
                                                 for p, q in zip(preps, pieces)])
                        row[f"chunks{c}_{tag}_us"] = round(t * 1e6, 3)
            best = min((v, key) for key, v in row.items() if key.endswith("_us") and key.startswith("chunks"))
            row["best"] = best[1]
            print(f"{args.format} {n:6d}x{k:<6d} M={m:<5d} bf16 {row['bf16_us']:8.2f}  layer {row['layer_us']:8.2f} "
                  f"({row['bf16_us'] / row['layer_us']:.2f}x)  best {best[1]} {best[0]:8.2f} "
                  f"({row['bf16_us'] / best[0]:.2f}x)", flush=True)
            result["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
        del layers, preps, w16
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
