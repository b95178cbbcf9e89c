"""``llmcomp report``: PNG plots and a markdown summary of an artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.pathflag import path_option


def report(
    artifact: Annotated[str, typer.Argument(help="llmcomp artifact to describe.")],
    output: Annotated[Optional[Path], path_option("--output", "-o", help="Directory to write report.md and the "
                                                                          "PNG plots into (default: ARTIFACT-report "
                                                                          "beside the artifact).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """Plot an artifact and summarize it in report.md (plots need matplotlib).

    Per-layer error, bits per weight, MoE experts, KV policy and linearized layers, where the artifact has them."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _quiet_transformers, run

    _quiet_transformers()

    def go():
        result = api.report(artifact, output, overwrite=overwrite)
        plots = result["plots"]
        listed = f", {len(plots)} plot{'s' * (len(plots) > 1)}: {', '.join(plots)}" if plots else ""
        render.wrote(f"{result['path']} (report.md{listed})")
        if result["plots_skipped"]:
            render.console.print(f"[yellow]plots skipped:[/yellow] {render.escape(str(result['plots_skipped']))}",
                                 highlight=False, soft_wrap=True)

    run(go)
