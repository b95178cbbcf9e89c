"""KV-cache policies on the bundled model: deltas vs the dense cache, measured in this run.

    python bench/kv.py --out bench/results/kv_cpu.json [--only mustafar-0.5 kivi-2 ...] [--windows 4]

Every policy row: ``api.prune_kv`` → artifact → ``llmcomp.load`` (the policy re-installs itself) →
``api.evaluate_long``: held-out continuation perplexity with the policy active (a 1536-token prefix is
prefilled and compressed, the next 511 tokens are teacher-forced in chunks of 64 on top of it),
passkey retrieval accuracy at 1K and 2K tokens (greedy ``generate``), and the KV bytes the cache
holds after the prefix. Rows are merged into ``--out`` as each finishes (``--only`` re-measures
some rows and keeps the others), so the table can be built over several short runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcomp import api
from llmcomp.core.model import DEFAULT_MODEL
from llmcomp.prune.kv import (A2SFConfig, CSKVConfig, DuoConfig, H2OConfig, KIVIConfig, MustafarConfig,
                              StreamingConfig)


def policies() -> dict:
    return {
        "mustafar-0.5": MustafarConfig(0.5, 0.5),
        "mustafar-0.7": MustafarConfig(0.7, 0.7),
        "kivi-4": KIVIConfig(bits=4),
        "kivi-2": KIVIConfig(bits=2),
        "streaming-0.5": StreamingConfig(ratio=0.5),
        "h2o-0.5": H2OConfig(ratio=0.5),
        "a2sf-0.5": A2SFConfig(ratio=0.5),
        "a2sf-0.5-f0.9": A2SFConfig(ratio=0.5, forget=0.9),
        "duo-0.5": DuoConfig(streaming=0.5),
        "cskv-0.5": CSKVConfig(k_ratio=0.5, v_ratio=0.5),
    }


def settings(args) -> dict:
    return {"context": args.context, "windows": args.windows, "chunk": args.chunk,
            "passkey_lengths": list(args.passkey_lengths), "passkey_samples": args.passkey_samples}


def with_deltas(row: dict, dense: dict) -> dict:
    row = dict(row)
    row["delta_ppl"] = row["ppl"] - dense["ppl"]
    row["delta_ppl_pct"] = 100 * (row["ppl"] / dense["ppl"] - 1)
    row["kv_fraction"] = row["kv_bytes"] / dense["kv_bytes"]
    row["delta_passkey"] = {k: row["passkey"][k] - dense["passkey"][k] for k in row.get("passkey", {})}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/kv_cpu.json"))
    ap.add_argument("--only", nargs="*", default=None, help="rows to (re)measure; 'dense' is the baseline")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--passkey-lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--passkey-samples", type=int, default=10)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    wanted = ["dense", *policies()] if not args.only else args.only
    unknown = [n for n in wanted if n != "dense" and n not in policies()]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from dense, {', '.join(policies())}")
    data = json.loads(args.out.read_text()) if args.out.exists() else {"meta": {}, "rows": []}
    if data.get("meta", {}).get("settings") not in (None, settings(args)):
        ap.error(f"{args.out} was measured with other settings {data['meta']['settings']}; use another --out")
    data["meta"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "model": DEFAULT_MODEL, "dtype": "float32",
                    "settings": settings(args)}
    rows = {r["name"]: r for r in data["rows"]}
    kw = dict(context=args.context, n_windows=args.windows, chunk=args.chunk, passkey_lengths=args.passkey_lengths,
              passkey_samples=args.passkey_samples, device=args.device)

    def save():
        dense = rows.get("dense")
        ordered = [rows[n] for n in ["dense", *policies()] if n in rows]
        data["rows"] = [with_deltas(r, dense) if dense and r["name"] != "dense" else r for r in ordered]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))

    if "dense" in wanted or "dense" not in rows:
        t = time.perf_counter()
        rows["dense"] = {**api.evaluate_long(DEFAULT_MODEL, **kw), "name": "dense",
                         "wall_s": round(time.perf_counter() - t, 1)}
        rows["dense"].pop("path")
        save()
        print(f"dense           ppl {rows['dense']['ppl']:.3f}  passkey {rows['dense']['passkey']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            if name == "dense":
                continue
            t = time.perf_counter()
            path = api.prune_kv(policies()[name], Path(tmp) / name, DEFAULT_MODEL, device=args.device)
            prune_s = time.perf_counter() - t
            row = {**api.evaluate_long(str(path), **kw), "name": name, "prune_s": round(prune_s, 1),
                   "wall_s": round(time.perf_counter() - t, 1)}
            row.pop("path")
            shutil.rmtree(path)  # a full-precision copy of the model each
            rows[name] = row
            save()
            r = with_deltas(row, rows["dense"])
            print(f"{name:15s} ppl {r['ppl']:.3f} ({r['delta_ppl_pct']:+.2f} %)  KV {100 * r['kv_fraction']:.1f} % "
                  f"of dense  passkey {r['passkey']}  prune {prune_s:.0f}s  total {r['wall_s']:.0f}s", flush=True)
    save()
    lengths = [str(n) for n in args.passkey_lengths]
    print(f"\n| policy | ppl | Δppl % | KV held (MB) | KV % of dense | " + " | ".join(f"passkey {n}" for n in lengths) + " |")
    print("|---|---|---|---|---|" + "---|" * len(lengths))
    for r in data["rows"]:
        delta = f"{r['delta_ppl_pct']:+.2f}" if "delta_ppl_pct" in r else "-"
        frac = f"{100 * r['kv_fraction']:.1f}" if "kv_fraction" in r else "100"
        print(f"| {r['name']} ({r['policy']}) | {r['ppl']:.3f} | {delta} | {r['kv_bytes'] / 2**20:.1f} | {frac} | "
              + " | ".join(f"{r['passkey'][n]:.2f}" for n in lengths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
