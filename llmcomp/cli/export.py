"""``llmcomp export``: write an artifact as a checkpoint other tools load (compressed-tensors, GPTQ)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmcomp.cli.pathflag import path_option


def export(
    artifact: Annotated[str, typer.Argument(help="llmcomp artifact to export.")],
    to: Annotated[str, typer.Option("--to", help="compressed-tensors (vLLM, llm-compressor; needs llmcomp\\[export]) or gptq "
                                                             "(transformers through optimum + gptqmodel).")],
    output: Annotated[Path, path_option("--output", "-o", help="Checkpoint directory to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """Export an artifact's quantized weights as a compressed-tensors or GPTQ checkpoint (lossless)."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _quiet_transformers, run

    _quiet_transformers()

    def go():
        summary = api.export(artifact, to, output, overwrite=overwrite)
        extra = f", checkpoint_format {summary['checkpoint_format']}" if "checkpoint_format" in summary else ""
        render.wrote(f"{summary['path']} ({summary['format']}{extra}: {summary['layers']} layers, {summary['scheme']})")

    run(go)
