"""``llmcomp convert``: architecture conversions that keep the trained weights (dense → MoE)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.pathflag import path_option

convert_app = typer.Typer(help="Convert a model to another architecture (dense → MoE).", no_args_is_help=True)


@convert_app.command("moefy")
def moefy(
    model: Annotated[Optional[str], typer.Argument(help="Dense Llama-style model directory (default: the bundled SmolLM2-135M-Instruct).")] = None,
    output: Annotated[Path, path_option("--output", "-o", help="Artifact directory to write.")] = Path("llmcomp-moe"),
    experts: Annotated[int, typer.Option(help="Routed experts per layer (the MLP's non-shared neurons split evenly).")] = 8,
    top_k: Annotated[int, typer.Option(help="Experts each token is routed to.")] = 2,
    shared: Annotated[int, typer.Option(help="Most important neurons kept in an always-on shared expert (Qwen2-MoE); 0 = none (Mixtral).")] = 512,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (clustering and routers).")] = 32,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling and clustering.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="Device (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as float32, float16 or bfloat16 (default: as in the model).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """MoEfication: cluster each MLP's neurons into experts and calibrate a router on the bundled text.
    The artifact is a stock transformers MoE (Mixtral, or Qwen2-MoE with --shared)."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _quiet_transformers, last_stage, run

    _quiet_transformers()

    def go():
        from llmcomp.convert.moefy import MoefyConfig

        config = MoefyConfig(experts=experts, top_k=top_k, shared=shared, seed=seed)
        with render.RichProgress() as progress:
            path = api.moefy(config, output, model, overwrite=overwrite, calib_samples=calib_samples,
                             calib_seq_len=seq_len, seed=seed, device=device, dtype=dtype, progress=progress)
        summary = last_stage(path)["metrics"]["_summary"]
        render.wrote(f"{path} ({summary['family']}, {experts} experts, top-{top_k}, {shared} shared neurons; "
                     f"mean MLP output error {100 * summary['mean_mlp_rel_error']:.1f} %)")

    run(go)
