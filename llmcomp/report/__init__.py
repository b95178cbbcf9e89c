"""``llmcomp report``: PNG plots and a markdown summary of an artifact, read from its manifest.

Nothing is loaded but the manifest, ``config.json`` and the weight files' headers: the model is built on
the meta device (``core.artifact.build_skeleton``) only to know each quantized linear's shape, hence its
bits per weight. Plots need matplotlib (optional extra ``report``); without it only ``report.md`` is
written and the result says why.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from llmcomp.core.paths import check_output
from llmcomp.errors import UserError
from llmcomp.report import facts as F

PLOTS_NEED = "matplotlib is not installed; pip install matplotlib"


def write_report(artifact, output=None, *, overwrite: bool = False) -> dict:
    """Write ``report.md`` and the plots that apply into ``output`` (default: ``<artifact>-report`` beside
    it), atomically. Returns ``{"path", "plots": [file names], "plots_skipped": reason or None}``."""
    from llmcomp.core.artifact import read_manifest
    from llmcomp.core.paths import as_path, atomic_dir
    from llmcomp.report import markdown

    path = as_path(artifact, "The artifact")
    manifest = read_manifest(path, hashes=False)  # a viewer: the seal and the files there (`inspect` hashes them)
    output = check_output(output if output is not None else path.resolve().parent / f"{path.resolve().name}-report",
                          overwrite, path)
    model_config = _json(path / "config.json")
    modules, totals = _modules_and_totals(path, manifest)
    views = [_view(i, s, model_config) for i, s in enumerate(manifest["stages"], 1)]
    skipped = None
    try:
        from llmcomp.report import plots

        plots.require_matplotlib()
    except ImportError:
        skipped = PLOTS_NEED
    with atomic_dir(output, overwrite=overwrite) as tmp:
        bits_png = None
        if skipped is None:
            for v in views:
                v["plots"] = _draw(v, tmp)
            per_layer = F.bits_facts(modules) if modules else None
            if per_layer is not None and per_layer.series():  # (none when only modules outside the layers are)
                bits_png = plots.bits(per_layer, path.resolve().name, tmp / "bits.png").name
        text = markdown.render(path, manifest, views, modules, totals, bits_png, skipped)
        (tmp / "report.md").write_text(text, encoding="utf-8")
        names = sorted(f.name for f in tmp.glob("*.png"))
    return {"path": output, "plots": names, "plots_skipped": skipped}


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _view(index: int, stage: dict, model_config: dict) -> dict:
    """A stage and what the report shows of it: ``kind`` and the facts of that kind."""
    from llmcomp.api import stage_label

    view = {"index": index, "stage": stage, "label": stage_label(stage), "plots": []}
    for kind, fn in (("quantize", F.quant_facts), ("experts", F.expert_facts), ("linearize", F.linearize_facts),
                     ("moefy", F.moefy_facts)):
        found = fn(stage)
        if found is not None:
            return {**view, "kind": kind, "facts": found}
    found = F.kv_facts(stage, model_config)
    if found is not None:
        return {**view, "kind": "kv", "facts": found}
    method = stage.get("method", "")
    kind = "import" if method.startswith("import-") else stage.get("kind") or "other"
    return {**view, "kind": kind, "facts": None}


def _draw(view: dict, out: Path) -> list[str]:
    """The plots of one stage (file names), drawn into ``out``."""
    from llmcomp.report import plots

    i, label, f = view["index"], f"stage {view['index']}: {view['label']}", view["facts"]
    kind = view["kind"]
    if kind == "quantize" and (f["sqnr"].cells or f["out_err"].cells):
        drawn = plots.errors(f["sqnr"], f["out_err"], label, out / f"errors-{i}.png")
    elif kind == "experts" and f["blocks"]:
        drawn = plots.experts(f, label, out / f"experts-{i}.png")
    elif kind == "kv" and f["k"]:
        drawn = plots.kv(f, label, out / f"kv-{i}.png")
    elif kind == "linearize" and f["transfer"]:
        layout = f["layout"]
        colors = {i: "tab:orange" if i < len(layout) and layout[i] == "softmax" else "tab:blue" for i in f["transfer"]}
        drawn = plots.per_layer_bars(f["transfer"], f"{label} — attention-transfer error; orange layers keep softmax",
                                     "transfer relative MSE", out / f"linearize-{i}.png", colors=colors,
                                     legend={"linear": "tab:blue", "softmax (kept)": "tab:orange"},
                                     curve=f["kl_curve"] if len(f["kl_curve"]) > 1 else None,
                                     curve_x=f["kl_steps"], curve_label="KL to the teacher")
    elif kind == "moefy" and f["error"]:
        drawn = plots.per_layer_bars(f["error"], f"{label} — MLP relative output error per layer",
                                     "MLP relative error", out / f"moefy-{i}.png")
    else:
        return []
    return [drawn.name]


def _modules_and_totals(path: Path, manifest: dict) -> tuple[dict, dict]:
    """``{module: (bits per weight, format)}`` and totals (bits per weight over the decoder linears as
    ``llmcomp eval`` counts them, weight bytes on disk, base model bytes when it is on this machine)."""
    from llmcomp.api import stages_seconds  # (importing it registers the stage hooks the skeleton needs)
    from llmcomp.core.artifact import build_skeleton
    from llmcomp.eval.size import size_report, weights_mb

    try:
        skeleton, _ = build_skeleton(path, manifest)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise UserError(f"{path}: cannot rebuild the model from its config.json and manifest ({exc}).") from None
    modules = {}
    for name in manifest["modules"]:
        mod = skeleton.get_submodule(name)
        modules[name] = (mod.fmt.bits_per_weight(mod.out_features, mod.in_features), mod.fmt.describe())
    _stored_dtypes(path, skeleton)
    totals = {**size_report(skeleton, path), "linears": sum(1 for _ in _linears(skeleton))}
    totals["wall_time_s"] = stages_seconds(manifest["stages"])
    base = manifest["base_model"].get("path")
    if base and Path(base).is_dir():
        mb = weights_mb(Path(base))
        if mb:
            totals["base_size_mb"] = mb
    return modules, totals


def _linears(model):
    from torch import nn

    from llmcomp.core.qlinear import QuantLinear

    return (n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear)))


def _stored_dtypes(path: Path, skeleton) -> None:
    """Give the skeleton's unquantized linears the dtype their weights are stored in (headers only)."""
    import torch
    from torch import nn

    from llmcomp.core.artifact import open_weights, weight_files

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    stored: dict[str, Optional[torch.dtype]] = {}
    for f in weight_files(path):
        if f.exists():
            with open_weights(f) as sf:
                stored.update({k: dtypes.get(sf.get_slice(k).get_dtype()) for k in sf.keys() if k.endswith(".weight")})
    for name, mod in skeleton.named_modules():
        if type(mod) is nn.Linear and stored.get(name + ".weight") is not None:
            mod.to(stored[name + ".weight"])
