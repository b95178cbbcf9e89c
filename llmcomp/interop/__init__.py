"""Interop: export llmcomp artifacts as checkpoints other tools load, and import theirs.

- ``compressed_tensors``: the format of vLLM and llm-compressor (``pack-quantized`` int, NVFP4, MXFP4)
- ``gptq_layout``: the GPTQ checkpoint layout that transformers loads through optimum + gptqmodel
- ``imports``: open a GPTQ or compressed-tensors checkpoint as a model with llmcomp ``uniform`` layers
"""
from __future__ import annotations

EXPORTERS = {"compressed-tensors": "llmcomp.interop.compressed_tensors:export_compressed_tensors",
             "gptq": "llmcomp.interop.gptq_layout:export_gptq"}
CHECKS = {"compressed-tensors": "llmcomp.interop.compressed_tensors:check", "gptq": "llmcomp.interop.gptq_layout:check"}


def _check(src, target: str) -> None:
    import importlib

    module, fn = CHECKS[target].split(":")
    getattr(importlib.import_module(module), fn)(src)


def checked_source(artifact, output, overwrite: bool, target: str, label: str):
    """``(output checked, the artifact opened)`` for an export to ``target`` (``label``: its name in messages),
    refused by that target's checks with `` Export to OTHER instead.`` where the other target takes it (each
    refusal pointed at the other, which refused it too: a ragged-group bit allocation)."""
    from llmcomp.core.paths import check_output
    from llmcomp.errors import UserError
    from llmcomp.interop.source import open_source

    output = check_output(output, overwrite, artifact)
    src = open_source(artifact, label)
    try:
        _check(src, target)
    except UserError as exc:
        other = next(t for t in CHECKS if t != target)
        try:
            _check(src, other)
            hint = f" Export to {other} instead."
        except UserError:
            hint = ""
        raise UserError(f"{exc}{hint}") from None
    return output, src


def export(artifact, to: str, output, *, overwrite: bool = False) -> dict:
    """Write ``artifact`` as a ``to`` checkpoint at ``output``; returns a summary dict."""
    import importlib

    from llmcomp.core.paths import as_path
    from llmcomp.errors import UserError

    artifact = as_path(artifact, "The artifact")
    if to not in EXPORTERS:
        raise UserError(f"Unknown export target {to!r}; choose one of: {', '.join(EXPORTERS)}.")
    module, fn = EXPORTERS[to].split(":")
    return getattr(importlib.import_module(module), fn)(artifact, output, overwrite=overwrite)
