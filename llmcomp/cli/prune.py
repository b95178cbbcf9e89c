"""``llmcomp prune``: commands that remove parts of a model or of its KV cache."""
from __future__ import annotations

import typer

from llmcomp.cli.prune_experts import dynamic, experts
from llmcomp.cli.prune_kv import kv

prune_app = typer.Typer(help="Prune a model (MoE experts, KV-cache policies).", no_args_is_help=True)
prune_app.command("kv")(kv)
prune_app.command("experts")(experts)
prune_app.command("dynamic")(dynamic)
