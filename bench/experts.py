"""MoE expert pruning on a real MoE: Austen ppl vs the fraction removed, every method, with/without the guard.

    python bench/experts.py --moe PATH [--out bench/results/experts_cpu.json] [--windows 16] [--only reap heapr]

``PATH`` is an MoE artifact; if it does not exist it is made first with the project's own command
(``llmcomp convert moefy``: the bundled SmolLM2-135M split into 8 experts, top-2, 512 shared neurons).
One calibration pass (``prune.experts.collect_stats``) gives every method its scores; each row then
prunes a copy of the model in memory (the same surgery ``llmcomp prune experts`` writes) and measures
held-out perplexity. Methods remove 12.5 / 25 / 50 % of each block's routed experts — HEAPr the same
fraction of its neurons (atomic experts), i.e. the same parameter reduction. Rows run with and without
the super-expert guard; a guarded row whose plan equals the unguarded one is not re-measured
(``heapr-diag``: HEAPr's diagonal score without the OBS update of the kept neurons). Rows are
merged into ``--out`` as each finishes (``--only`` re-measures some and keeps the rest).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from llmcomp import api
from llmcomp.convert.moefy import MoefyConfig
from llmcomp.core import memory
from llmcomp.core.data import calib_windows, corpus
from llmcomp.eval.perplexity import perplexity
from llmcomp.prune import experts, moe
from llmcomp.prune.experts import METHODS, ExpertPruneConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

RATIOS = (0.125, 0.25, 0.5)
QUANT = ("rtn-w3g64", "alloc3-plain", "alloc3-mcmoe", "alloc3-fisher", "alloc3.5-fisher", "dynamic-0.15",
         "alloc3-mcmoe+dynamic-0.15")


def settings(args) -> dict:
    return {"windows": args.windows, "seq_len": 512, "calib_samples": args.calib_samples, "seed": args.seed,
            "moe": str(args.moe)}


def plan_key(model) -> str:
    """Identifies the pruned weights (shapes and sums), so identical plans are measured once."""
    blocks = moe.find_moe_blocks(model)
    sums = [round(float(b.weights(e)[2].detach().sum()), 6) for b in blocks for e in range(b.num_experts)]
    return json.dumps(moe.shapes(model), sort_keys=True) + str(sums)


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moe", type=Path, required=True, help="MoE artifact (made with llmcomp convert moefy if missing)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/experts_cpu.json"))
    ap.add_argument("--only", nargs="+", default=None,
                    help="methods (or 'dense', 'moe', 'se': remove only the super experts vs a control, 'quant' or one of "
                         f"{', '.join(QUANT)}: MC-MoE quantization and dynamic-skip rows) to (re)measure")
    ap.add_argument("--windows", type=_cli.count(1), default=16)
    ap.add_argument("--calib-samples", type=_cli.count(1), default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    wanted = args.only or ["dense", "moe", "se", *METHODS, "heapr-diag", "quant"]
    # (a mistyped name measured nothing, exit 0)
    _cli.unknown(ap, wanted, ["dense", "moe", "se", *METHODS, "heapr-diag", "quant", *QUANT])
    _cli.check(ap, memory.check_device, args.device)  # (a bad one was torch's traceback after the first model load)
    data = _cli.results(ap, args.out) or {"meta": {}, "rows": []}
    if (data.get("meta") or {}).get("settings") not in (None, settings(args)):
        ap.error(f"{args.out} was measured with other settings {data['meta']['settings']}; use another --out")
    if args.moe.exists():  # (checked before the dense row; the Path itself: str() of ./smollm2-135m is the alias)
        _cli.check(ap, api.inspect, args.moe)
    else:
        t = time.perf_counter()
        print(f"making {args.moe} with llmcomp convert moefy ...", flush=True)
        api.moefy(MoefyConfig(), args.moe, None, device=args.device)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    data["meta"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                    "threads": torch.get_num_threads(), "text": corpus().name, "settings": settings(args),
                    "moefy": (api.inspect(args.moe).get("stages") or [{}])[0].get("config")}  # (None: not moefy's)
    rows = {r["name"]: r for r in data["rows"]}

    def save():
        data["rows"] = list(rows.values())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=1))

    def evaluate(net, tok):
        net.to(args.device)
        t = time.perf_counter()
        r = perplexity(net, tok, seq_len=512, n_windows=args.windows, batch_size=4)
        return {"ppl": r["ppl"], "eval_s": round(time.perf_counter() - t, 1)}

    base, tok, _, _ = api.open_model(args.moe)
    # (a dense --moe measured itself as the MoE row, then failed at the first pruning row)
    _cli.check(ap, moe.require_moe, base, f"--moe {args.moe}", "this bench")
    if "dense" in wanted:
        net, dense_tok, _, _ = api.open_model(None)  # (None: the bundled model)
        rows["dense"] = {"name": "dense", "method": "dense", "ratio": 0.0, **evaluate(net, dense_tok)}
        save()
        print(f"dense          ppl {rows['dense']['ppl']:.3f}", flush=True)
        del net
    total_params = sum(p.numel() for p in base.parameters())
    before = experts.expert_params(base)
    if "moe" in wanted:
        rows["moe"] = {"name": "moe", "method": "none", "ratio": 0.0, "expert_params": before,
                       "total_params": total_params, **evaluate(base, tok)}
        save()
        print(f"moe            ppl {rows['moe']['ppl']:.3f}", flush=True)
    quant = [q for q in QUANT if q in wanted or "quant" in wanted]
    if quant:
        quant_rows(args, rows, save, quant)
    methods = [m for m in (*METHODS, "heapr-diag") if m in wanted]
    if not methods and "se" not in wanted:
        return 0
    t = time.perf_counter()
    ids = calib_windows(tok, 512, args.calib_samples, args.seed)
    stats = experts.collect_stats(base, ids, ExpertPruneConfig(), device=args.device)
    calib_s = round(time.perf_counter() - t, 1)
    found = experts.super_experts(stats)
    data["meta"]["calibration_s"] = calib_s
    data["meta"]["super_experts"] = found
    every = torch.cat([st.max_out for st in stats.values()])
    data["meta"]["max_down_proj_output"] = {"median": float(every.median()), "max": float(every.max()),
                                            "super": {p: [float(stats[p].max_out[e]) for e in es]
                                                      for p, es in found.items()}}
    print(f"calibration pass {calib_s:.0f} s; super experts: {found or 'none'}", flush=True)
    if "se" in wanted and found:
        super_expert_rows(base, tok, stats, found, rows, save, evaluate)
    for method in methods:
        for ratio in RATIOS:
            done = {}
            for guard in (False, True):
                name = f"{method}-{ratio:g}-{'guard' if guard else 'noguard'}"
                # heapr-diag: HEAPr's own diagonal score, no OBS update of the kept neurons
                cfg = ExpertPruneConfig(method=method.split("-")[0], ratio=ratio, protect_super_experts=guard,
                                        seed=args.seed, compensate=method != "heapr-diag")
                net = copy.deepcopy(base)
                t = time.perf_counter()
                report = experts.prune(net, stats, cfg)
                prune_s = round(time.perf_counter() - t, 2)
                key = plan_key(net)
                after = experts.expert_params(net)
                row = {"name": name, "method": method, "ratio": ratio, "guard": guard, "prune_s": prune_s,
                       "expert_params": after, "expert_params_removed": before - after,
                       "removed_fraction_of_experts": round(1 - after / before, 5),
                       "removed_fraction_of_model": round((before - after) / total_params, 5),
                       "mb_saved_fp32": round((before - after) * 4 / 1e6, 2),
                       "protected_skipped": {p: r["skipped_protected"] for p, r in report["layers"].items()
                                             if r.get("skipped_protected")}}
                if key in done:
                    row.update({k: done[key][k] for k in ("ppl", "eval_s")}, same_plan_as=done[key]["name"])
                else:
                    row.update(evaluate(net, tok))
                    done[key] = row
                del net
                rows[name] = row
                save()
                print(f"{name:24s} ppl {row['ppl']:9.3f}  expert params −{100 * row['removed_fraction_of_experts']:.1f} % "
                      f"({row['mb_saved_fp32']:.1f} MB fp32){'  [same plan]' if 'same_plan_as' in row else ''}",
                      flush=True)
    return 0


def super_expert_rows(base, tok, stats, found, rows, save, evaluate) -> None:
    """Remove only the super experts, and as a control the same number of other experts of the same blocks
    (those with the smallest down_proj maxima)."""
    blocks_of = lambda net: {b.path: b for b in moe.find_moe_blocks(net)}  # noqa: E731
    for name in ("se-only", "se-control"):
        net = copy.deepcopy(base)
        blocks = blocks_of(net)
        removed = {}
        for path, es in found.items():
            st = stats[path]
            others = [e for e in torch.argsort(st.max_out).tolist() if e not in es][: len(es)]
            drop = es if name == "se-only" else others
            moe.keep_experts(blocks[path], [e for e in range(st.num_experts) if e not in drop])
            removed[path] = drop
        rows[name] = {"name": name, "method": name, "removed": removed, **evaluate(net, tok)}
        save()
        print(f"{name:24s} ppl {rows[name]['ppl']:9.3f}  removed {removed}", flush=True)


def quant_rows(args, rows, save, names) -> None:
    """MC-MoE: RTN W3 g64 everywhere vs a 3.0 bits/weight allocation over candidates 2/3/4 (g64) scored by each
    layer's output error without and with MC-MoE's routing-mass weighting of expert errors, and scored by the
    default diagonal Fisher (loss-based: routing is already inside the gradient), also at 3.5 b/w (the uniform
    row's size); dynamic skipping of 15 % of the routed slots on the
    MoE and on top of the MC-MoE artifact. Every row is an artifact loaded back by llmcomp.load."""
    import tempfile
    from unittest import mock

    from llmcomp.formats import Uniform
    from llmcomp.prune.mcmoe import DynamicSkipConfig
    from llmcomp.quant import RTNConfig
    from llmcomp.quant.allocate import AllocationConfig

    cfg = RTNConfig(format=Uniform(bits=3, group_size=64), ignore=("lm_head", "mlp.gate"))
    alloc = AllocationConfig(budget=3.0, candidates=(2, 3, 4), group_size=64, sensitivity="output")
    fisher = AllocationConfig(budget=3.0, candidates=(2, 3, 4), group_size=64, sensitivity="fisher")
    kw = dict(calib_samples=args.calib_samples, seed=args.seed, device=args.device)
    with tempfile.TemporaryDirectory(dir=args.moe.parent) as tmp:
        made = {}
        for name in names:
            t = time.perf_counter()
            out = Path(tmp) / name
            if name == "rtn-w3g64":
                api.quantize(cfg, out, args.moe, device=args.device)  # (RTN reads no calibration text)
            elif name == "alloc3-plain":  # the same allocation with every expert's error at face value
                with mock.patch("llmcomp.prune.mcmoe.expert_importance", lambda *a, **k: {}):
                    api.quantize(cfg, out, args.moe, allocation=alloc, **kw)
            elif name == "alloc3-mcmoe":
                api.quantize(cfg, out, args.moe, allocation=alloc, **kw)
            elif name == "alloc3-fisher":
                api.quantize(cfg, out, args.moe, allocation=fisher, **kw)
            elif name == "alloc3.5-fisher":  # the uniform row's 3.5 b/w, for a comparison at equal size
                api.quantize(cfg, out, args.moe, allocation=dataclasses.replace(fisher, budget=3.5), **kw)
            elif name == "dynamic-0.15":
                api.skip_experts(DynamicSkipConfig(0.15), out, args.moe, **kw)
            else:
                if "alloc3-mcmoe" not in made:
                    made["alloc3-mcmoe"] = Path(tmp) / "alloc3-mcmoe"
                    api.quantize(cfg, made["alloc3-mcmoe"], args.moe, allocation=alloc, **kw)
                api.skip_experts(DynamicSkipConfig(0.15), out, made["alloc3-mcmoe"], **kw)
            made[name] = out
            make_s = round(time.perf_counter() - t, 1)
            r = api.evaluate(str(out), seq_len=512, n_windows=args.windows, device=args.device)
            stage = api.inspect(out)["stages"][-1]
            rows[name] = {"name": name, "method": name, "ppl": r["ppl"], "bits_per_weight": r["bits_per_weight"],
                          "size_mb": r["size_mb"], "make_s": make_s, "eval_s": r["eval_time_s"],
                          "skip_threshold": stage.get("skip_threshold"),
                          "skipped_slots_calibration": stage["metrics"].get("skipped_slots_calibration")}
            save()
            print(f"{name:28s} ppl {r['ppl']:9.3f}  bits/weight {r['bits_per_weight']:.3f}  size {r['size_mb']:.1f} MB "
                  f"({make_s:.0f} s)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
