"""KV-cache policies recorded in artifacts and applied by a transformers ``Cache`` (see cache.py).

Methods: ``mustafar`` (bitmap-compressed unstructured sparsity), ``kivi`` (2/3/4/8-bit), ``streaming``,
``h2o``, ``a2sf`` (eviction), ``duo`` (retrieval vs streaming heads), ``cskv`` (low-rank channels).
Names resolve lazily so that ``import llmcomp`` does not import transformers' cache machinery.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "KV_METHODS": "base", "KVPolicy": "base",
    "KVCache": "cache", "install": "cache", "uninstall": "cache", "installed_policy": "cache",
    "MustafarConfig": "mustafar", "KIVIConfig": "kivi", "StreamingConfig": "evict", "H2OConfig": "evict",
    "A2SFConfig": "evict", "DuoConfig": "duo", "CSKVConfig": "cskv",
}
POLICY_MODULES = ("mustafar", "kivi", "evict", "duo", "cskv")

__all__ = sorted(_EXPORTS) + ["load_policies"]


def load_policies():
    """Import every policy module (registers their configs and method names); returns ``KV_METHODS``."""
    for name in POLICY_MODULES:
        importlib.import_module(f"llmcomp.prune.kv.{name}")
    return importlib.import_module("llmcomp.prune.kv.base").KV_METHODS


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name == "KV_METHODS":
        return load_policies()
    return getattr(importlib.import_module(f"llmcomp.prune.kv.{_EXPORTS[name]}"), name)
