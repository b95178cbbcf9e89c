"""Peer rows for the quality table: HQQ (half-quadratic quantization, calibration-free) on the bundled model,
evaluated with llmcomp's own eval (same text, windows and reference as bench/quality.py).

    pip install --no-deps hqq termcolor   # hqq 0.2.8 builds from source; CPU is enough
    python bench/peers_hqq.py --out bench/results/quality_cpu_peers.json

Each decoder linear (lm_head excluded, as in llmcomp) is quantized by ``hqq.core.quantize.Quantizer`` and
dequantized back into the fp32 model, which is saved as a plain model directory and evaluated. Bits per
weight count HQQ's packed codes plus one float16 scale and zero per group, its default storage.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcomp import api
from llmcomp.core.model import decoder_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

ROWS = {"hqq-w4g128": (4, 128), "hqq-w4g64": (4, 64), "hqq-w3g128": (3, 128), "hqq-w2g64": (2, 64)}


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality_cpu_peers.json"))
    ap.add_argument("--windows", type=_cli.count(1), default=16)
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    _cli.unknown(ap, args.only, ROWS)  # (a mistyped name measured nothing and wrote an empty table, exit 0)
    _cli.writable(ap, args.out)
    try:
        import hqq
        from hqq.core.quantize import Quantizer
    except ImportError as exc:
        print(f"HQQ not importable ({exc}); install it as the docstring says.", file=sys.stderr)
        return 2
    ref = api.record_reference(None, n_windows=args.windows)
    rows = []
    meta = {"hqq": getattr(hqq, "__version__", "0.2.8"), "torch": torch.__version__, "windows": args.windows}
    for name, (nbits, group) in ROWS.items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        net, tok, _, _ = api.open_model(None)
        prefix, _ = decoder_layers(net)
        n_weights = n_bits = 0
        with torch.no_grad():
            for mname, mod in net.named_modules():
                if isinstance(mod, torch.nn.Linear) and mname.startswith(prefix + "."):
                    W = mod.weight.data.float()
                    Wq, qmeta = Quantizer.quantize(W, nbits=nbits, group_size=group, optimize=True, axis=1,
                                                   device="cpu", compute_dtype=torch.float32)
                    mod.weight.data = Quantizer.dequantize(Wq, qmeta).reshape(W.shape).to(W.dtype)
                    n_weights += W.numel()
                    n_bits += W.numel() * nbits + 32 * (W.numel() // group)
        quant_s = time.perf_counter() - t
        tmp = Path(tempfile.mkdtemp(prefix="hqq-"))
        try:
            net.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            row = {"name": name, **api.evaluate(str(tmp), n_windows=args.windows, reference=ref),
                   "quant_time_s": round(quant_s, 1), "bits_per_weight_quantized_linears": n_bits / n_weights}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row.pop("bits_per_weight", None)  # the saved model is dense fp32; HQQ's own storage is counted above
        rows.append(row)
        print(f"{name:12s} ppl {row['ppl']:8.2f}  kld {row['kld_mean']:.4f}  top1 {row['top1_agree']:.3f}  "
              f"bpw(linears) {row['bits_per_weight_quantized_linears']:.3f}  {quant_s:6.1f}s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
