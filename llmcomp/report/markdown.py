"""``report.md``: the model, a table of stages, totals, one section per stage with its table and plots."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from statistics import mean

from llmcomp.report.facts import kind_label, kind_order, shown_config, split_path, stage_bits, transfer_means


def _f(v, digits=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if 0.1 <= abs(v) < 1e5 or v == 0 else f"{v:.3g}"  # (0.004, not 0.00)
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return out + [""]


def render(path: Path, manifest: dict, views: list[dict], modules: dict, totals: dict, bits_png, skipped) -> str:
    base = manifest["base_model"]
    lines = [f"# llmcomp report: {Path(path).resolve().name}", "",
             f"Artifact `{path}` — base model **{base.get('name')}** (sha256 `{str(base.get('sha256'))[:12]}…`), "
             f"llmcomp {manifest.get('llmcomp_version')}, text: {manifest.get('text_source') or '-'}.", ""]
    if skipped:
        lines += [f"Plots not drawn: {skipped}.", ""]
    lines += ["## Totals", ""] + _table(["", ""], _totals(modules, totals))
    lines += ["## Stages", ""] + _table(["#", "stage", "kind", "wall s", "result"],
                                        [[v["index"], v["label"], v["kind"], v["stage"].get("wall_time_s"),
                                          _summary(v)] for v in views])
    evaluations = manifest.get("evaluations") or []
    if evaluations:
        lines += ["## Recorded evaluations", ""] + _table(
            ["stages", "ppl", "bits/weight", "size MB", "text", "windows × tokens"],
            [[e.get("stages"), e.get("ppl"), e.get("bits_per_weight"), e.get("size_mb"), e.get("text"),
              f"{e.get('windows')} × {e.get('seq_len')}"] for e in evaluations])
    if modules:
        lines += ["## Bits per weight", "", "Storage bits per weight of every quantized linear (codes, scales, zeros, "
                  "outliers), per decoder layer.", ""]
        if bits_png:
            lines += [f"![bits per weight per linear]({bits_png})", ""]
        elif not skipped:  # (the plot has no decoder layer to draw: only lm_head, say, is quantized)
            lines += ["No decoder layer has a quantized linear; outside them: " + ", ".join(
                f"`{p}` {bits:.2f} ({fmt})" for p, (bits, fmt) in modules.items()) + ".", ""]
    for v in views:
        lines += [f"## Stage {v['index']}: {v['label']}", "", _config_line(v["stage"]), ""]
        lines += _DETAILS.get(v["kind"], lambda v: [])(v)
        lines += [f"![{v['kind']} stage {v['index']}]({p})" for p in v["plots"]] + ([""] if v["plots"] else [])
    return "\n".join(lines).rstrip() + "\n"


def _totals(modules: dict, totals: dict) -> list[list]:
    rows = [["bits per weight (decoder linears, lm_head excluded)", f"{totals['bits_per_weight']:.3f}"]]
    size = totals.get("size_mb")
    if size is not None:
        rows.append(["weights on disk", f"{size:.1f} MB"])
    if totals.get("base_size_mb"):
        rows.append(["base model weights", f"{totals['base_size_mb']:.1f} MB ({totals['base_size_mb'] / size:.2f}× "
                                           "the artifact)" if size else f"{totals['base_size_mb']:.1f} MB"])
    formats = Counter(fmt for _, fmt in modules.values())
    rows.append(["quantized linears", f"{len(modules)} of {totals['linears']}"
                 + (": " + ", ".join(f"{k} × {n}" for k, n in formats.most_common()) if formats else "")])
    rows.append(["stage wall time", f"{totals['wall_time_s']:.1f} s"])
    return rows


def _config_line(stage: dict) -> str:
    cfg = shown_config(stage.get("config"))
    calib = stage.get("calibration")
    extra = f" Calibration: {calib}." if calib else ""
    return f"Config: `{cfg}`.{extra}"


def _summary(v: dict) -> str:
    stage, f, kind = v["stage"], v["facts"], v["kind"]
    metrics = stage.get("metrics", {})
    if kind == "quantize":
        bits, covers = stage_bits(metrics)
        out = [f"{bits:.2f} b/w{covers}"] if bits is not None else []
        values = list(f["sqnr"].modules.values())  # (one by one: a layer's experts averaged hid the worst)
        if values:
            out.append(f"SQNR {min(values):.1f}–{max(values):.1f} dB (mean {mean(values):.1f})")
        errs = [x for per in f["out_err"].cells.values() for values in per.values() for x in values]
        if errs:
            out.append(f"output error mean {mean(errs):.3g}, max {max(errs):.3g}")
        if f["allocation"]:
            used = {k: n for k, n in f["allocation"]["layers_per_format"].items() if n}
            out.append("allocation " + ", ".join(f"{k} × {n}" for k, n in used.items()))
        return "; ".join(out)
    if kind == "experts":
        frac = f["params"].get("removed_fraction")
        counts = [f"{b['experts']}→{b['experts'] - len(b['removed'])}" if b["unit"] == "experts"
                  else f"{sum(b['before'])}→{sum(b['before']) - sum(b['removed_per_expert'])}" for b in f["blocks"]]
        head = f"{100 * frac:.1f} % of expert parameters removed; " if frac is not None else ""
        more = " …" if len(counts) > 8 else ""
        return head + f"{f['blocks'][0]['unit']} per layer " + ", ".join(counts[:8]) + more
    if kind == "kv":
        return f["policy"]
    if kind == "linearize":
        layout = f["layout"]
        means = transfer_means(f["transfer"], layout, lambda m: f"{m:.3g}")
        tune = f["finetune"]
        out = [f"{layout.count('linear')} linear / {layout.count('softmax')} softmax layers"]
        if means:
            out.append(f"transfer rel. MSE mean {means}")
        if "kl_first" in tune:
            out.append(f"fine-tune KL {_f(tune['kl_first'], 3)} → {_f(tune['kl_last'], 3)} over {tune.get('steps')} "
                       "steps")
        return "; ".join(out)
    if kind == "moefy":
        s = f["summary"]
        return f"{s.get('family')}: mean MLP rel. error {_f(s.get('mean_mlp_rel_error'), 4)}"
    if kind == "import":
        bits, covers = stage_bits(metrics)
        return f"{metrics.get('imported_layers')} layers imported, {_f(bits)} b/w{covers}"
    if "skip_threshold" in stage:
        return (f"dynamic skip threshold {stage['skip_threshold']:.4g}; "
                f"{100 * metrics.get('skipped_slots_calibration', 0):.1f} % of expert slots skipped on calibration "
                "text")
    if stage.get("method") == "unfuse-experts":
        return "fused experts stored as one linear pair per expert"
    return ", ".join(f"{k} {_f(val)}" for k, val in metrics.items() if isinstance(val, (int, float)))


def _quant_details(v: dict) -> list[str]:
    f = v["facts"]
    err = bool(f["out_err"].cells)  # (a calibrated method's output errors, per decoder layer)
    layers = sorted(set(f["sqnr"].layers()) | set(f["out_err"].layers()))
    bits = (f["allocation"] or {}).get("bits", {})
    per_layer_bits: dict = {}
    order = kind_order(split_path(p)[1] for p in bits)
    for path in sorted(bits, key=lambda p: order.index(split_path(p)[1])):
        layer = split_path(path)[0]
        per_layer_bits.setdefault(layer, []).append(f"{kind_label(path)} {bits[path]}")
    rows = []
    for i in layers:
        cells = f["sqnr"].in_layer(i)
        worst = min(cells, key=cells.get) if cells else None
        row = [i, mean(cells.values()) if cells else None,
               f"{worst} {cells[worst]:.1f}" if worst else "-"]
        if err:
            errs = list(f["out_err"].in_layer(i).values())
            row.append(mean(errs) if errs else None)
        if bits:
            row.append(", ".join(per_layer_bits.get(i, [])))
        rows.append(row)
    header = ["layer", "SQNR mean dB", "lowest SQNR (dB)"] + (["output error mean"] if err else []) + (
        ["allocated code bits"] if bits else [])
    out = _table(header, rows) if rows else []
    if f["sqnr"].outside:
        out += [", ".join(f"`{p}` SQNR {x:.1f} dB" for p, x in f["sqnr"].outside.items()) + " (outside the decoder "
                "layers).", ""]
    return out


def _expert_details(v: dict) -> list[str]:
    rows = []
    for b in v["facts"]["blocks"]:
        if b["unit"] == "neurons":
            rows.append([b["layer"], sum(b["before"]), sum(b["before"]) - sum(b["removed_per_expert"]),
                         " ".join(map(str, b["removed_per_expert"])), " ".join(map(str, b["super"])) or "-"])
        else:
            rows.append([b["layer"], b["experts"], b["experts"] - len(b["removed"]),
                         " ".join(map(str, b["removed"])) or "-", " ".join(map(str, b["super"])) or "-"])
    unit = v["facts"]["blocks"][0]["unit"] if rows else "experts"
    what = "neurons removed per expert" if unit == "neurons" else "removed experts"
    return _table(["layer", f"{unit} before", "kept", what, "super experts"], rows)


def _kv_details(v: dict) -> list[str]:
    f = v["facts"]
    out = [f"{f['policy']}: {f['what']}.", ""]
    if f.get("heads"):
        gates = f.get("gates")
        rows = [[i, "".join("R" if h else "s" for h in row), sum(row),
                 " ".join(f"{g:.2f}" for g in gates[i]) if gates else "-"] for i, row in enumerate(f["heads"])]
        out += _table(["layer", "heads (R retrieval, s streaming)", "retrieval", "calibrated gates"], rows)
    return out


def _linearize_details(v: dict) -> list[str]:
    f = v["facts"]
    rows = [[i, kind, f["transfer"].get(i)] for i, kind in enumerate(f["layout"])]
    return _table(["layer", "attention", "transfer rel. MSE (stage 1)"], rows)


def _moefy_details(v: dict) -> list[str]:
    f = v["facts"]
    return _table(["layer", "MLP rel. error", "router / oracle agreement"],
                  [[i, f["error"][i], f["agreement"].get(i)] for i in sorted(f["error"])])


_DETAILS = {"quantize": _quant_details, "experts": _expert_details, "kv": _kv_details,
            "linearize": _linearize_details, "moefy": _moefy_details}
