"""One layer selector for every method: ``targets`` and ``ignore`` patterns.

A pattern matches a module when it is
- the module's class name (``"Linear"``),
- its full path or a dotted suffix of it (``"lm_head"``, ``"mlp.down_proj"``), or
- ``"re:<regex>"`` that fully matches its path (``"re:.*layers\\.0\\..*"``).
An ignored module's children are ignored too.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

from torch import nn

from llmcomp.errors import UserError


def matches(pattern: str, path: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], path) is not None
        except re.error as exc:
            raise UserError(f"Invalid layer pattern {pattern!r}: {exc}.") from None
    return pattern == type(module).__name__ or path == pattern or path.endswith("." + pattern)


def select(
    root: nn.Module,
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = ("lm_head",),
    prefix: str = "",
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for modules under ``root`` matching a target and no ignore pattern; a pattern that
    matches a container (``mlp``, ``layers.1``, ``LlamaMLP``) targets or ignores everything under it."""
    targets, ignore = list(targets), list(ignore)
    ignored: list[str] = []  # paths of ignored modules (named_modules yields a parent before its children)
    targeted: list[str] = []
    for name, mod in root.named_modules():
        if not name:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if any(path.startswith(p + ".") for p in ignored) or any(matches(i, path, mod) for i in ignore):
            ignored.append(path)
            continue
        if any(path.startswith(p + ".") for p in targeted) or any(matches(t, path, mod) for t in targets):
            targeted.append(path)
            yield path, mod


def unmatched(root: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The patterns that match no module under ``root`` (a misspelt --target or --ignore)."""
    left = list(dict.fromkeys(patterns))
    for name, mod in root.named_modules():
        if name:
            left = [p for p in left if not matches(p, name, mod)]
        if not left:
            break
    return left


def select_linears(root: nn.Module, targets: Iterable[str] = ("Linear",), ignore: Iterable[str] = ("lm_head",)
                   ) -> Iterator[tuple[str, nn.Linear]]:
    """``select``'s ``nn.Linear`` modules that hold weights: an empty one (an expert HEAPr emptied, zero-width but
    still taking its routing slot) has nothing to quantize and stays as it is."""
    for path, mod in select(root, targets, ignore):
        if isinstance(mod, nn.Linear) and mod.weight.numel():
            yield path, mod
