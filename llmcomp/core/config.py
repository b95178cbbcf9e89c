"""Frozen, versioned config dataclasses with a JSON round trip.

Every config class registers itself with ``@register_config``; ``from_json`` only builds classes from
that allow-list (never arbitrary types), so a manifest cannot instantiate anything unexpected.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from llmcomp.core.registry import Registry
from llmcomp.errors import UserError

CONFIGS: Registry[type] = Registry("config type")


def register_config(cls):
    """Class decorator: register a frozen dataclass config under its class name."""
    assert dataclasses.is_dataclass(cls), cls
    CONFIGS.register(cls.__name__)(cls)
    return cls


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"_type": type(obj).__name__, "_version": getattr(obj, "VERSION", 1)}
        for f in dataclasses.fields(obj):
            out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot serialize {type(obj).__name__} in a config")


def from_dict(data: Any) -> Any:
    if isinstance(data, dict) and "_type" in data:
        cls = CONFIGS.get(data["_type"])
        version = data.get("_version", 1)
        if version > getattr(cls, "VERSION", 1):
            raise UserError(
                f"Config {data['_type']} has version {version}, newer than this llmcomp supports; upgrade llmcomp."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: from_dict(v) for k, v in data.items() if k in names}
        # JSON has no tuples: restore them where the dataclass default is a tuple.
        for f in dataclasses.fields(cls):
            if f.name in kwargs and isinstance(kwargs[f.name], list):
                kwargs[f.name] = tuple(kwargs[f.name])
        return cls(**kwargs)
    if isinstance(data, list):
        return [from_dict(v) for v in data]
    if isinstance(data, dict):
        return {k: from_dict(v) for k, v in data.items()}
    return data


def finite(obj: Any) -> Any:
    """``obj`` with NaN and ±inf floats as None, at any depth: JSON has no such numbers (``json.dumps`` writes bare
    ``NaN`` / ``Infinity``, which strict parsers refuse) — a NaN model's ppl, a change from a zero baseline."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """JSON text of ``obj`` with non-finite floats as null (``finite``)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def to_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)


def from_json(text: str) -> Any:
    return from_dict(json.loads(text))
