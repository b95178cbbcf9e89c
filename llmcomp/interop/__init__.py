"""Interop: export llmcomp artifacts as checkpoints other tools load, and import theirs.

- ``compressed_tensors``: the format of vLLM and llm-compressor (``pack-quantized`` int, NVFP4, MXFP4)
- ``gptq_layout``: the GPTQ checkpoint layout that transformers loads through optimum + gptqmodel
- ``imports``: open a GPTQ or compressed-tensors checkpoint as a model with llmcomp ``uniform`` layers
"""
from __future__ import annotations

EXPORTERS = {"compressed-tensors": "llmcomp.interop.compressed_tensors:export_compressed_tensors",
             "gptq": "llmcomp.interop.gptq_layout:export_gptq"}
CHECKS = {"compressed-tensors": "llmcomp.interop.compressed_tensors:check", "gptq": "llmcomp.interop.gptq_layout:check"}


def alternative(src, target: str) -> str:
    """`` Export to TARGET instead.`` where ``target``'s checks take the artifact ``src``, else nothing (each
    target's refusal pointed at the other, which refused it too: a ragged-group bit allocation)."""
    import importlib

    from llmcomp.errors import UserError

    module, fn = CHECKS[target].split(":")
    try:
        getattr(importlib.import_module(module), fn)(src)
    except UserError:
        return ""
    return f" Export to {target} instead."


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
