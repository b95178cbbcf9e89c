"""``llmcomp prune experts``: remove routed experts (or HEAPr atomic experts) of an MoE model."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.pathflag import path_option
from llmcomp.errors import UserError


def parse_layer_ratios(items: list[str]) -> dict:
    """``["3=0.5", "7=0.125"]`` → ``{"3": 0.5, "7": 0.125}``."""
    out = {}
    for item in items:
        layer, sep, value = item.partition("=")
        try:
            if not sep or not layer.strip().isdigit():
                raise ValueError
            key = str(int(layer))  # ("03" is layer 3)
            ratio = float(value)
        except ValueError:
            raise UserError(f"--layer-ratio takes LAYER=RATIO such as 3=0.5, got {item!r}.") from None
        if key in out:  # (the last one won, silently)
            raise UserError(f"--layer-ratio gives layer {key} twice ({out[key]:g} and {ratio:g}); give it once.")
        out[key] = ratio
    return out


def experts(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="MoE model directory or llmcomp artifact (e.g. one made by `llmcomp convert moefy`).")] = None,
    output: Annotated[Path, path_option("--output", "-o", help="Artifact directory to write.")] = Path("llmcomp-experts"),
    method: Annotated[str, typer.Option(help="random | frequency (router selections) | reap (gate weight × output norm) | reconstruct (greedy, block output error) | heapr (atomic experts = neurons, second-order, per layer).")] = "reap",
    ratio: Annotated[float, typer.Option(help="Fraction of each block's routed experts to remove (heapr: of its neurons), in (0, 1).")] = 0.25,
    layer_ratio: Annotated[list[str], typer.Option("--layer-ratio", help="Per-layer override LAYER=RATIO (repeatable); counts then differ between layers.")] = [],
    protect: Annotated[bool, typer.Option("--protect-super-experts/--no-protect-super-experts", help="Never remove super experts (extreme down_proj output outliers on the calibration text).")] = True,
    compensate: Annotated[bool, typer.Option("--compensate/--no-compensate", help="heapr: OBS update of the kept neurons' output scales (folded into down_proj).")] = True,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and --method random.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="Device for calibration (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as float32, float16 or bfloat16 (default: as in the model).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """Remove experts scored from one calibration pass; the artifact loads with llmcomp.load (and with stock
    from_pretrained only where every layer keeps the same expert count, not with HEAPr or --layer-ratio: the
    command says so)."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _given, _quiet_transformers, last_stage, run

    _quiet_transformers()

    def go():
        from llmcomp.prune.experts import ExpertPruneConfig

        if method != "heapr" and _given(ctx, ["compensate"]):
            raise UserError(f"--compensate / --no-compensate apply to --method heapr (its OBS update of the kept "
                            f"neurons), not to {method}.")

        config = ExpertPruneConfig(method=method, ratio=ratio, protect_super_experts=protect,
                                   layer_ratios=parse_layer_ratios(layer_ratio), seed=seed, compensate=compensate)
        with render.RichProgress() as progress:
            path = api.prune_experts(config, output, model, overwrite=overwrite, calib_samples=calib_samples,
                                     calib_seq_len=seq_len, seed=seed, device=device, dtype=dtype, progress=progress)
        metrics = last_stage(path)["metrics"]
        found = metrics["super_experts"]
        se = ", ".join(f"{p} {e}" for p, e in found.items()) or "none"
        render.wrote(f"{path}: {100 * metrics['expert_params']['removed_fraction']:.1f} % of expert parameters "
                     f"removed; super experts {se}{' (protected)' if protect and found else ''}")
        if not metrics.get("stock_loadable", True):  # (stock from_pretrained would fill the experts randomly)
            render.wrote("load it with llmcomp.load: its experts no longer have the config's shapes, and stock "
                         "from_pretrained would fill them with random weights", label="note:")

    run(go)


def dynamic(
    model: Annotated[Optional[str], typer.Argument(help="MoE model directory or llmcomp artifact (pruned or quantized ones too).")] = None,
    output: Annotated[Path, path_option("--output", "-o", help="Artifact directory to write.")] = Path("llmcomp-dynamic"),
    rate: Annotated[float, typer.Option(help="Fraction of all routed (token, expert) slots to skip, calibrated on the text (a token's first expert is never skipped).")] = 0.15,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="Device for calibration (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as float32, float16 or bfloat16 (default: as in the model).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """MC-MoE online dynamic pruning: record a threshold τ on w_j / w_1; at run time a token's later expert
    choices below τ × its first choice's weight are skipped (llmcomp.load re-installs it)."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _quiet_transformers, last_stage, run

    _quiet_transformers()

    def go():
        from llmcomp.prune.mcmoe import DynamicSkipConfig

        with render.RichProgress() as progress:
            path = api.skip_experts(DynamicSkipConfig(rate=rate), output, model, overwrite=overwrite,
                                    calib_samples=calib_samples, calib_seq_len=seq_len, seed=seed, device=device,
                                    dtype=dtype, progress=progress)
        stage = last_stage(path)
        render.wrote(f"{path}: skip threshold {stage['skip_threshold']:.4g} "
                     f"({100 * stage['metrics']['skipped_slots_calibration']:.1f} % of routed slots on the calibration "
                     "text)")

    run(go)
