"""KV-cache policies on the bundled model: deltas vs the dense cache, measured in this run.

    python bench/kv.py --out bench/results/kv_cpu.json [--only mustafar-0.5 kivi-2 ...] [--windows 4]
    python bench/kv.py --device cuda --passkey-lengths 1024 2048 4096 8186 --time-budget 480 --out ...

Every policy row: ``api.prune_kv`` → artifact → ``llmcomp.load`` (the policy re-installs itself) →
``api.evaluate_long``: held-out continuation perplexity with the policy active (3/4 of each ``--context``
window is prefilled and compressed, the rest teacher-forced in chunks of ``--chunk`` on top of it),
passkey and multi-key needle retrieval accuracy at each ``--passkey-lengths`` (greedy ``generate``;
``--needle-keys`` labelled needles per multi-key prompt, one asked), and the KV bytes the cache holds
after the prefix. Rows are merged into ``--out`` as each finishes (``--only`` re-measures some rows and
keeps the others), so the table can be built over several short runs. ``--time-budget`` stops before a
row that would not finish in the budget (estimated as 1.25 × the slowest row of this run) and names the
rows left; each row records its wall time and the seconds of each part (``times_s``).
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
from llmcomp.core import memory
from llmcomp.core.model import DEFAULT_MODEL
from llmcomp.errors import UserError
from llmcomp.prune.kv import (A2SFConfig, CSKVConfig, DuoConfig, H2OConfig, KIVIConfig, MustafarConfig,
                              StreamingConfig)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


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
            "passkey_lengths": list(args.passkey_lengths), "passkey_samples": args.passkey_samples,
            "needle_keys": args.needle_keys}


def with_deltas(row: dict, dense: dict) -> dict:
    row = dict(row)
    row["delta_ppl"] = row["ppl"] - dense["ppl"]
    row["delta_ppl_pct"] = 100 * (row["ppl"] / dense["ppl"] - 1)
    row["kv_fraction"] = row["kv_bytes"] / dense["kv_bytes"]
    for task in ("passkey", "multikey"):
        if task in row and task in dense:
            row[f"delta_{task}"] = {k: row[task][k] - dense[task][k] for k in row[task] if k in dense[task]}
    return row


def accuracy_cell(row: dict, task: str, length: str) -> str:
    value = row.get(task, {}).get(length)
    if value is None:
        return "-"
    delta = row.get(f"delta_{task}", {}).get(length)
    return f"{value:.2f}" + (f" ({delta:+.2f})" if delta is not None else "")


def markdown_table(rows: list[dict], lengths: list[int], needle_keys: int) -> str:
    cols = [f"passkey {n}" for n in lengths] + ([f"{needle_keys}-key {n}" for n in lengths] if needle_keys else [])
    lines = ["| policy | ppl | Δppl % | KV held (MB) | KV % of dense | " + " | ".join(cols) + " | wall s |",
             "|---|---|---|---|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        delta = f"{r['delta_ppl_pct']:+.2f}" if "delta_ppl_pct" in r else "-"
        frac = f"{100 * r['kv_fraction']:.1f}" if "kv_fraction" in r else "100"
        cells = [accuracy_cell(r, "passkey", str(n)) for n in lengths]
        cells += [accuracy_cell(r, "multikey", str(n)) for n in lengths] if needle_keys else []
        lines.append(f"| {r['name']} ({r['policy']}) | {r['ppl']:.3f} | {delta} | {r['kv_bytes'] / 2**20:.1f} "
                     f"| {frac} | "
                     + " | ".join(cells) + f" | {r.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


def summary(r: dict) -> str:
    text = f"{r['name']:15s} ppl {r['ppl']:.3f}"
    if "delta_ppl_pct" in r:
        text += f" ({r['delta_ppl_pct']:+.2f} %)  KV {100 * r['kv_fraction']:.1f} % of dense"
    text += f"  passkey {r.get('passkey', {})}"
    if "multikey" in r:
        text += f"  {r['needle_keys']}-key {r['multikey']}"
    return text + f"  prune {r.get('prune_s', 0):.0f}s  total {r['wall_s']:.0f}s  parts {r.get('times_s', {})}"


def check_lengths(args) -> None:
    """Lengths against the bundled model's context, before any work (UserError when they do not fit)."""
    from llmcomp.core import model as model_mod

    # (None, not the alias: "smollm2-135m" is refused where a folder of that name is in the working directory)
    api.check_long_lengths(api.context_limit(model_mod.resolve(None)), args.context, args.passkey_lengths,
                           args.passkey_samples)


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/kv_cpu.json"))
    ap.add_argument("--only", nargs="+", default=None,
                    help="rows to (re)measure, in this order; 'dense' is the baseline")
    ap.add_argument("--context", type=_cli.count(16), default=2048)
    ap.add_argument("--windows", type=_cli.count(1), default=4)
    ap.add_argument("--chunk", type=_cli.count(1), default=64)
    ap.add_argument("--passkey-lengths", type=_cli.count(1), nargs="+", default=[1024, 2048])
    ap.add_argument("--passkey-samples", type=_cli.count(0), default=10)
    ap.add_argument("--needle-keys", type=_cli.count(0), default=4,
                    help="needles per multi-key prompt (0 = no multi-key)")
    ap.add_argument("--time-budget", type=_cli.number(0), default=0,
                    help="seconds: start no row that would end past this (estimate: 1.25 × the slowest row so "
                         "far); 0 = none")
    ap.add_argument("--threads", type=_cli.count(1), default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wanted = ["dense", *policies()] if not args.only else args.only
    _cli.unknown(ap, wanted, ["dense", *policies()])
    # (the library's own checks of these, before the first row: --needle-keys 99 was refused after the reads)
    _cli.check(ap, api.check_long, args.context, args.windows, args.passkey_lengths, args.passkey_samples,
               args.needle_keys, chunk=args.chunk)
    _cli.check(ap, memory.check_device, args.device)
    data = _cli.results(ap, args.out) or {"meta": {}, "rows": []}
    _cli.check(ap, check_lengths, args)
    if (data.get("meta") or {}).get("settings") not in (None, settings(args)):
        ap.error(f"{args.out} was measured with other settings {data['meta']['settings']}; use another --out")
    data["meta"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                    "device": args.device, "threads": torch.get_num_threads(), "model": DEFAULT_MODEL,
                    "dtype": "float32", "settings": settings(args)}
    rows = {r["name"]: r for r in data["rows"]}
    kw = dict(context=args.context, n_windows=args.windows, chunk=args.chunk, passkey_lengths=args.passkey_lengths,
              passkey_samples=args.passkey_samples, needle_keys=args.needle_keys, device=args.device)

    def save():
        dense = rows.get("dense")
        ordered = [rows[n] for n in ["dense", *policies()] if n in rows]
        data["rows"] = [with_deltas(r, dense) if dense and r["name"] != "dense" else r for r in ordered]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))

    todo = [n for n in wanted if n != "dense"]
    if "dense" in wanted or "dense" not in rows:
        todo.insert(0, "dense")
    slowest, skipped = 0.0, []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, name in enumerate(todo):
                elapsed = time.perf_counter() - start
                if args.time_budget and slowest and elapsed + 1.25 * slowest > args.time_budget:
                    skipped = todo[i:]
                    break
                t = time.perf_counter()
                row, path = {"name": name}, None  # (None: the bundled model)
                if name != "dense":
                    path = api.prune_kv(policies()[name], Path(tmp) / name, None, device=args.device)
                    row["prune_s"] = round(time.perf_counter() - t, 1)
                row = {**api.evaluate_long(path, **kw), **row, "wall_s": round(time.perf_counter() - t, 1)}
                row.pop("path")
                if name != "dense":
                    shutil.rmtree(path)  # a full-precision copy of the model each
                rows[name] = row
                save()
                slowest = max(slowest, row["wall_s"])
                print(summary(with_deltas(row, rows["dense"]) if name != "dense" else row), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save()
    if skipped:
        print(f"\ntime budget {args.time_budget:.0f}s: stopped after {time.perf_counter() - start:.0f}s (slowest row "
              f"{slowest:.0f}s); not measured: {' '.join(skipped)} — rerun with --only {' '.join(skipped)}")
    print()
    print(markdown_table(data["rows"], args.passkey_lengths, args.needle_keys))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
