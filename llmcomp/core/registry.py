"""Name → class registries (weight formats, methods, configs).

Dispatch is by registered name or config type, never by ``if mode == "..."`` chains.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from llmcomp.errors import UserError

T = TypeVar("T")


def load_all() -> None:
    """Import the layers that register the formats, methods, configs and stage hooks (``import llmcomp`` loads its
    names lazily, so a caller may hold a core module alone): core calls this on a name it does not know before it
    calls the name unknown — without importing those layers itself."""
    import importlib

    for name in ("llmcomp.api", "llmcomp.quant.presets", "llmcomp.prune.experts", "llmcomp.prune.mcmoe",
                 "llmcomp.convert.moefy", "llmcomp.linearize.distill"):
        importlib.import_module(name)
    importlib.import_module("llmcomp.prune.kv").load_policies()


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            load_all()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise UserError(f"Unknown {self.kind} {name!r}; choose one of: {known}.") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def items(self):
        return self._items.items()
