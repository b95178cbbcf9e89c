"""Frozen, versioned config dataclasses with a JSON round trip.

Every config class registers itself with ``@register_config``; ``from_json`` only builds classes from
that allow-list (never arbitrary types), so a manifest cannot instantiate anything unexpected.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

from llmcomp.core.registry import Registry
from llmcomp.errors import FieldError, UserError

CONFIGS: Registry[type] = Registry("config type")


def register_config(cls):
    """Class decorator: register a frozen dataclass config under its class name. Its scalar fields are
    type-checked at construction (``check_field_types``)."""
    assert dataclasses.is_dataclass(cls), cls
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except (TypeError, AttributeError, UserError):
            check_field_types(self)  # (a wrong-typed field is the clearer cause of the error its checks raised:
            raise                    # bits="4" read "must be an integer from 2 to 8, got 4")
        check_field_types(self)

    cls.__init__ = __init__
    CONFIGS.register(cls.__name__)(cls)
    return cls


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


SEED_LIMIT = 2 ** 62  # (torch's generators take < 2**64; per-layer seeds add the layer index)


def check_seed(seed: Any, what: str = "--seed") -> None:
    """A whole number in [0, SEED_LIMIT): 2**64 overflowed inside torch after the model had loaded, 1.5 reached
    torch.manual_seed."""
    tail = _seed_fault(seed)
    if tail:
        raise UserError(f"{what} {tail}")


def _seed_fault(seed: Any) -> str:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        return f"must be a whole number in [0, 2**62), got {seed!r}."
    return ""


def check_field_types(obj: Any) -> None:
    """A UserError for a config field of the wrong type: ``symmetric="no"`` was truthy (a symmetric grid),
    ``bits=4.0`` was stored and broke the artifact's loader, ``targets="Linear"`` was split into letters.
    Fields not yet set (the constructor's own TypeError) are skipped."""
    for f in dataclasses.fields(obj):
        if not hasattr(obj, f.name):
            continue
        value, kind = getattr(obj, f.name), str(f.type)
        if value is None and f.default is None:
            continue
        classes = _classes(type(obj), kind)
        inner = kind[len("Optional["):-1] if kind.startswith("Optional[") else kind
        if kind in _SCALARS:  # (NaN passed every range check: `nan <= 0` is False)
            ok = isinstance(value, _SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool)) and not (
                isinstance(value, float) and math.isnan(value))
        elif inner.startswith("tuple"):  # (a list is taken as the tuple it stands for)
            item = {"tuple[str, ...]": (str,), "tuple[int, ...]": (int,)}.get(inner, (object,))
            ok = isinstance(value, (tuple, list)) and all(isinstance(v, item) and not isinstance(v, bool)
                                                          for v in value)
            if ok and isinstance(value, list):
                object.__setattr__(obj, f.name, tuple(value))
        elif inner.startswith("dict"):
            ok = isinstance(value, dict)
        elif classes:  # (a format field: Uniform, BlockFP | Uniform, ...)
            ok = isinstance(value, classes)
        else:
            continue
        fault = _seed_fault(value) if ok and f.name == "seed" else ""
        if fault:  # (a FieldError: a command line names its --seed)
            raise FieldError(type(obj).__name__, "seed", fault)
        if not ok:
            want = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
                    "tuple[str, ...]": "a tuple of strings", "tuple[int, ...]": "a tuple of integers"}.get(
                inner, "a tuple" if inner.startswith("tuple") else "a dict" if inner.startswith("dict")
                else " or ".join(c.__name__ for c in classes))
            raise FieldError(type(obj).__name__, f.name, f"must be {want}, got {value!r}.")


def field_classes(cls: type, name: str) -> tuple:
    """The classes field ``name`` of dataclass ``cls`` is annotated with (``format: Uniform | BlockFP``); ()
    where the annotation names no classes."""
    kind = next((str(f.type) for f in dataclasses.fields(cls) if f.name == name), "")
    return _classes(cls, kind) if kind else ()


def _classes(cls: type, kind: str) -> tuple:
    """The classes an annotation such as ``Uniform | BlockFP`` names, as ``cls``'s module sees them (none where
    one of them is not a class there)."""
    import sys

    scope = vars(sys.modules[cls.__module__])
    found = tuple(scope.get(n.strip()) for n in kind.split("|"))
    return found if found and all(isinstance(c, type) for c in found) else ()


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
