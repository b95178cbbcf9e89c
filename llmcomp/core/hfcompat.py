"""Names that moved between transformers releases (one place, so every caller agrees).

transformers 5.2x renamed the cache argument and output field ``past_key_values`` to ``cache`` (the
old names keep working, with a deprecation warning, until 5.40); llmcomp supports both.
"""
from __future__ import annotations

import inspect

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def cache_kwarg(module) -> str:
    """The keyword under which ``module.forward`` takes the KV cache."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def pop_cache(kwargs: dict):
    """Remove and return the cache from a forward's keyword arguments, under any of its names."""
    found = None
    for name in CACHE_KWARGS:
        value = kwargs.pop(name, None)
        found = value if found is None else found
    return found


def output_cache(out):
    """The cache a model output carries (``out.cache`` or, before the rename, ``out.past_key_values``)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return getattr(out, "cache") if "cache" in fields else getattr(out, "past_key_values", None)


def fit_experts(model) -> None:
    """Fused-expert MoE layers (one ``[experts, out, in]`` weight) run through torch's ``grouped_mm`` by default,
    which needs every stride a multiple of 16 bytes: a moefied model of 45 neurons an expert failed with "strides
    should be multiple of 16 bytes". Where a fused weight has a dimension past the first that is not a multiple
    of 8 (16 bytes in 16-bit floats; a load may cast to them), the model's experts run eagerly instead."""
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return
    for mod in model.modules():
        if "Experts" not in type(mod).__name__:
            continue
        if any(p.dim() == 3 and any(d % 8 for d in p.shape[1:]) for p in mod.parameters(recurse=False)):
            model.set_experts_implementation("eager")
            return
