"""Quality table on the bundled model: ppl, KLD, top-1 agreement, greedy prefix, bits/weight, time.

    python bench/quality.py --out bench/results/quality_cpu.json [--windows 16] [--only rtn-w4g128 ...]

Every row is produced in this run (quantize → artifact → llmcomp.load → eval against the original).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcomp import api
from llmcomp.core.paths import write_json
from llmcomp.formats import Uniform
from llmcomp.quant import METHODS, RTNConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


def configs() -> dict:
    out = {
        "rtn-w8": RTNConfig(format=Uniform(bits=8, group_size=0, symmetric=True)),
        "rtn-w4g128": RTNConfig(format=Uniform(bits=4, group_size=128)),
        "rtn-w4g64": RTNConfig(format=Uniform(bits=4, group_size=64)),
        "rtn-w4": RTNConfig(format=Uniform(bits=4, group_size=0)),
        "rtn-w3g128": RTNConfig(format=Uniform(bits=3, group_size=128)),
        "rtn-w3g64": RTNConfig(format=Uniform(bits=3, group_size=64)),
    }
    if "fp4" in METHODS:  # issue 5: W4A16 FP4 RTN next to INT4 at the same block sizes (sym = FP4's symmetry)
        from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
        from llmcomp.quant.fp4 import FP4Config

        out.update({"fp4-mxfp4": FP4Config(format=MXFP4()), "fp4-nvfp4": FP4Config(format=NVFP4()),
                    "fp4-e2m1g32": FP4Config(format=FP4(group_size=32)),
                    "rtn-w4g32": RTNConfig(format=Uniform(bits=4, group_size=32)),
                    "rtn-w4g16": RTNConfig(format=Uniform(bits=4, group_size=16)),
                    "rtn-w4g32sym": RTNConfig(format=Uniform(bits=4, group_size=32, symmetric=True)),
                    "rtn-w4g16sym": RTNConfig(format=Uniform(bits=4, group_size=16, symmetric=True))})
    if "gptq" in METHODS:
        from llmcomp.quant.gptq import GPTQConfig

        for name, fmt in {"w4g128": Uniform(bits=4, group_size=128), "w4g64": Uniform(bits=4, group_size=64),
                          "w4": Uniform(bits=4, group_size=0), "w3g128": Uniform(bits=3, group_size=128),
                          "w3g64": Uniform(bits=3, group_size=64)}.items():
            out[f"gptq-{name}"] = GPTQConfig(format=fmt)
        out["rtn-w2g64"] = RTNConfig(format=Uniform(bits=2, group_size=64))
        out["gptq-w2g64"] = GPTQConfig(format=Uniform(bits=2, group_size=64))
        out["gptq-w3"] = GPTQConfig(format=Uniform(bits=3, group_size=0))
        out["gptq-w2"] = GPTQConfig(format=Uniform(bits=2, group_size=0))
        for name, fmt in {"w4g128": Uniform(bits=4, group_size=128), "w3g128": Uniform(bits=3, group_size=128),
                          "w3": Uniform(bits=3, group_size=0), "w2g64": Uniform(bits=2, group_size=64),
                          "w2": Uniform(bits=2, group_size=0)}.items():
            out[f"gptq-noact-{name}"] = GPTQConfig(format=fmt, act_order=False)
        out["gptq-w3g128-out0.5"] = GPTQConfig(format=Uniform(bits=3, group_size=128), outliers=0.005)
        out["gptq-w2g64-out0.5"] = GPTQConfig(format=Uniform(bits=2, group_size=64), outliers=0.005)
        out["rtn-w3"] = RTNConfig(format=Uniform(bits=3, group_size=0))
        out["rtn-w2"] = RTNConfig(format=Uniform(bits=2, group_size=0))
        if "fp4" in METHODS:  # issue 5: GPTQ on the FP4 grids and the LLM-FP4 search
            out["gptq-nvfp4"] = GPTQConfig(format=NVFP4())
            out["gptq-mxfp4"] = GPTQConfig(format=MXFP4())
            out["gptq-w4g32"] = GPTQConfig(format=Uniform(bits=4, group_size=32))
            out["gptq-w4g16"] = GPTQConfig(format=Uniform(bits=4, group_size=16))
            out["fp4-search-g32"] = FP4Config(format=FP4(group_size=32), search=True)
            out["fp4-w4a4-naive"] = FP4Config(format=FP4(group_size=32), act_bits=4, smooth=0.0)
            out["fp4-w4a4-llmfp4"] = FP4Config(format=FP4(group_size=32), act_bits=4, smooth=0.5, search=True)
            out["fp4-w4a4-smooth"] = FP4Config(format=FP4(group_size=32), act_bits=4, smooth=0.5)
            out["rtn-w4a4-int-naive"] = RTNConfig(format=Uniform(bits=4, group_size=32), act_bits=4, smooth=0.0)
            out["rtn-w4a4-int"] = RTNConfig(format=Uniform(bits=4, group_size=32), act_bits=4, smooth=0.5)
            out["rtn-w4g128-a4-int"] = RTNConfig(format=Uniform(bits=4, group_size=128), act_bits=4, smooth=0.5)
    if "decoupleq" in METHODS:
        from llmcomp.quant.decoupleq import DecoupleQConfig

        for name, fmt in {"w4g128": Uniform(bits=4, group_size=128), "w3g128": Uniform(bits=3, group_size=128),
                          "w3": Uniform(bits=3, group_size=0), "w2g64": Uniform(bits=2, group_size=64),
                          "w2": Uniform(bits=2, group_size=0)}.items():
            out[f"decoupleq-{name}"] = DecoupleQConfig(format=fmt)
    return out


# name → (method, average bits/weight budget, group size of the candidates 2/3/4/8, sensitivity). Scales and
# zeros count in the budget: at g64 they add 0.5 b/w, so a 2.5 budget leaves every layer at 2 bits; g128 adds
# ~0.27 on this model. Uniform rows at the same bits: W2 g64 = 2.5, W3 g128 = 3.27, W3 g64 = 3.5 b/w.
ALLOCATIONS = {"gptq-alloc2.5": ("gptq", 2.5, 64, "output"), "gptq-alloc3.25": ("gptq", 3.25, 64, "output"),
               "gptq-alloc2.5-g128": ("gptq", 2.5, 128, "output"), "gptq-alloc3.25-g128": ("gptq", 3.25, 128, "output"),
               "gptq-alloc2.5-fisher": ("gptq", 2.5, 128, "fisher"), "gptq-alloc3.27-fisher": ("gptq", 3.27, 128, "fisher"),
               "gptq-alloc3.5-fisher": ("gptq", 3.5, 128, "fisher"),
               "decoupleq-alloc2.5-fisher": ("decoupleq", 2.5, 128, "fisher"),
               "rtn-alloc2.5-fisher": ("rtn", 2.5, 128, "fisher"), "rtn-alloc3.27-fisher": ("rtn", 3.27, 128, "fisher"),
               "rtn-alloc3.5-fisher": ("rtn", 3.5, 128, "fisher"), "rtn-alloc3.5-output": ("rtn", 3.5, 128, "output")}


def measure_row(name: str, cfg, ref, tmp: Path, windows: int, calib_samples: int) -> dict:
    """One row: quantize the bundled model → artifact → llmcomp.load → eval against the original.
    ``cfg`` is a method config or (config, AllocationConfig)."""
    t = time.perf_counter()
    cfg, alloc = cfg if isinstance(cfg, tuple) else (cfg, None)
    from llmcomp.quant import METHODS

    calibrates = alloc is not None or METHODS.get(cfg.method)(cfg).needs_calibration
    calib = {"calib_samples": calib_samples} if calibrates else {}  # (refused where nothing calibrates)
    path = api.quantize(cfg, Path(tmp) / name, None, allocation=alloc, **calib)  # (None: the bundled model)
    quant_s = time.perf_counter() - t
    row = {"name": name, **api.evaluate(str(path), n_windows=windows, reference=ref), "quant_time_s": round(quant_s, 1)}
    print(f"{name:14s} ppl {row['ppl']:8.2f}  kld {row['kld_mean']:.4f}  top1 {row['top1_agree']:.3f}  "
          f"prefix {row['greedy_prefix']:5.1f}  bpw {row['bits_per_weight']:.3f}  {quant_s:6.1f}s", flush=True)
    return row


def run_meta(args, text: str) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": torch.get_num_threads(), "windows": args.windows, "seq_len": 512,
            "calib_samples": args.calib_samples, "text": text}


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality_cpu.json"))
    ap.add_argument("--windows", type=_cli.count(1), default=16)
    ap.add_argument("--calib-samples", type=_cli.count(1), default=128)
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    # (a mistyped name measured nothing and wrote --out with the original row only, exit 0)
    _cli.unknown(ap, args.only, [*configs(), *ALLOCATIONS])
    previous = _cli.results(ap, args.out)
    todo = {k: v for k, v in configs().items() if not args.only or k in args.only}
    from llmcomp.quant import DecoupleQConfig, GPTQConfig
    from llmcomp.quant.allocate import AllocationConfig

    method_config = {"rtn": RTNConfig, "gptq": GPTQConfig, "decoupleq": DecoupleQConfig}
    for name, (method, budget, group, sensitivity) in ALLOCATIONS.items():
        if not args.only or name in args.only:
            todo[name] = (method_config[method](format=Uniform(bits=4, group_size=group)), AllocationConfig(
                budget=budget, candidates=(2, 3, 4, 8), group_size=group, sensitivity=sensitivity))
    ref = api.record_reference(None, n_windows=args.windows)  # (None: the bundled model)
    rows = [{"name": "original", **api.evaluate(None, n_windows=args.windows, reference=ref)}]
    meta = run_meta(args, rows[0]["text"])
    # (--only re-measures some rows and keeps the others: it rewrote --out with its own rows only)
    # (evaluate names the first row smollm2-135m: a rerun kept the old one beside the new)
    kept = [r for r in (previous or {"rows": []})["rows"] if r["name"] not in ("original", rows[0]["name"], *todo)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in todo.items():
            rows.append(measure_row(name, cfg, ref, Path(tmp), args.windows, args.calib_samples))
            # after every row: a run cut short keeps what it measured
            write_json(args.out, {"meta": meta, "rows": rows + kept}, partial=True)
    rows += kept
    write_json(args.out, {"meta": meta, "rows": rows})
    print("\n| method | ppl | KLD mean | top-1 % | greedy prefix | bits/weight | quant s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ppl']:.2f} | {r['kld_mean']:.4f} | {100 * r['top1_agree']:.1f} | "
              f"{r['greedy_prefix']:.1f} | {r['bits_per_weight']:.2f} | {r.get('quant_time_s', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
