"""Vector quantization quality on the bundled model: VPTQ-style, PVQ, PVQ + Hadamard at ~2 and ~3 bits.

    OMP_NUM_THREADS=1 python bench/vq.py [--only vptq-2 pvq-had-3 ...] [--only gptq-w2 decoupleq-w2]

Rows come from bench/quality.py's ``measure_row`` (quantize → artifact → llmcomp.load → eval against the
original); ``--only`` also accepts any row name of quality.py (scalar baselines re-run here). Each VQ
row also records the reference decode cost: ``load_s`` (llmcomp.load) and ``dequant_s`` (dequantizing
every QuantLinear once, what eval pays before its first forward). Rows are merged by name into
``--out`` after every row, so separate invocations build one table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmcomp
from llmcomp import api
from llmcomp.core.model import DEFAULT_MODEL
from llmcomp.core.qlinear import QuantLinear
from llmcomp.core.paths import write_json
from llmcomp.quant.pvq import PVQConfig, pyramid_for_bits
from llmcomp.quant.vptq import VPTQConfig, codebook_for_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)
import quality  # noqa: E402  (bench/quality.py: measure_row, run_meta, configs)


def configs() -> dict:
    out = {}
    for b in (2, 3):
        out[f"vptq-{b}"] = VPTQConfig(format=codebook_for_bits(b))
        out[f"pvq-{b}"] = PVQConfig(format=pyramid_for_bits(b))
        out[f"pvq-had-{b}"] = PVQConfig(format=pyramid_for_bits(b, rotate=True))
    out["vptq-2.25"] = VPTQConfig(format=codebook_for_bits(2.25))
    out["vptq-3.25"] = VPTQConfig(format=codebook_for_bits(3.25))
    out["vptq-2-nofb"] = VPTQConfig(format=codebook_for_bits(2), feedback=False)
    out["vptq-2-out2"] = VPTQConfig(format=codebook_for_bits(2, outliers=0.02))
    out["pvq-had-2-nohessian"] = PVQConfig(format=pyramid_for_bits(2, rotate=True), hessian=False)
    out["pvq-had-3.25"] = PVQConfig(format=pyramid_for_bits(3.25, rotate=True))
    return out


DEFAULT_ROWS = ["vptq-2", "pvq-2", "pvq-had-2", "vptq-3", "pvq-3", "pvq-had-3"]


def decode_cost(path: Path) -> dict:
    t = time.perf_counter()
    model = llmcomp.load(path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.dequantize()
    return {"load_s": round(load_s, 1), "dequant_s": round(time.perf_counter() - t, 1)}


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results/vq_cpu.json"))
    ap.add_argument("--windows", type=_cli.count(1), default=16)
    ap.add_argument("--calib-samples", type=_cli.count(1), default=64)
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    known = {**quality.configs(), **configs()}
    names = args.only or DEFAULT_ROWS
    _cli.unknown(ap, names, sorted(known))
    previous = _cli.results(ap, args.out) or {"rows": []}
    rows = {r["name"]: r for r in previous["rows"] if r["name"] != DEFAULT_MODEL}  # older runs named it so
    ref = api.record_reference(None, n_windows=args.windows)  # (None: the bundled model)
    original = {**api.evaluate(None, n_windows=args.windows, reference=ref), "name": "original"}
    rows["original"] = original
    meta = quality.run_meta(args, original["text"])

    def save():
        write_json(args.out, {"meta": meta, "rows": list(rows.values())})

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = known[name]
            row = quality.measure_row(name, cfg, ref, Path(tmp), args.windows, args.calib_samples)
            fmt = getattr(cfg, "format", None)
            row["format"] = fmt.describe() if fmt is not None else None
            if name in configs():
                row.update(decode_cost(Path(tmp) / name))
                print(f"{'':14s} load {row['load_s']}s  dequantize all layers {row['dequant_s']}s", flush=True)
            rows[name] = row
            save()  # after every row: a run cut short keeps what it measured
    print("\n| method | format | ppl | KLD mean | top-1 % | bits/weight | quant s | dequant s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['name']} | {r.get('format') or '-'} | {r['ppl']:.2f} | {r['kld_mean']:.4f} | "
              f"{100 * r['top1_agree']:.1f} | {r['bits_per_weight']:.3f} | {r.get('quant_time_s', '-')} | "
              f"{r.get('dequant_s', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
