"""Path flags (``--output``, ``--out``, ``--json``, ``--junit``, ``--baseline``, ``--offload-folder``) read one way:
click turns ``''`` into ``Path('.')`` before a command sees it, so ``-o ''`` was taken for the current folder."""
from __future__ import annotations

from pathlib import Path

import typer

METAVAR = "<path>"


def path_flag(text) -> Path:
    """A flag's text as a Path; an empty one is refused by click as a bad value of that flag (one line, exit 2)."""
    from llmcomp.core.paths import blank_path

    if isinstance(text, Path):  # (a default)
        return text
    blank = blank_path(str(text))
    if blank:
        raise typer.BadParameter(f"{blank}; give a path.")
    return Path(text)


def path_option(*names: str, **kwargs):
    """``typer.Option`` for a Path flag, its value read by ``path_flag``."""
    return typer.Option(*names, parser=path_flag, metavar=METAVAR, **kwargs)
