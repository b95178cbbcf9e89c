"""What the bench scripts share on their command lines: bad input is one line naming the problem and exit 2, never a
traceback. Not a bench script itself; a script imports it as ``_cli`` (``python bench/x.py`` puts bench/ on the path;
a script loaded from elsewhere, as the tests load them, inserts its folder first).

- argparse types (``count``, ``number``, ``ints``, ``names``, ``tuples``: ``shapes``, ``launches``): a bad value is
  refused while the arguments are read, before any model loads (``--windows 0`` was a traceback, or a misleading
  error, after minutes of work);
- ``check``: a library validator (``memory.check_device``, a config's own checks) as ``ap.error``;
- ``unknown``: the names of ``--only`` (and the like) that the script does not know, refused as one line;
- ``results``: ``--out`` checked before any work (a directory, a folder that cannot be made, a file that is not
  this script's results, a file an llmcomp artifact's load reads: each a traceback, or the artifact replaced, after
  the run had measured its rows); its folder is made when the results are written (``paths.write_json``);
- ``needs_cuda`` / ``needs_triton``: a GPU-only script on a machine without one says so in one line;
- ``one_line_errors``: a ``UserError`` the library raises during the run, as one line and exit 2.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

from llmcomp.errors import UserError


def count(low: int = 1):
    """argparse type: an integer ≥ ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {value}")
        return value

    return parse


def number(low: float = 0.0, above: bool = False):
    """argparse type: a finite number ≥ ``low`` (> ``low`` with ``above``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if above else '≥'} {low:g}, got {text}")
        return value

    return parse


def ints(low: int = 1, example: str = "1,16", allow_empty: bool = False):
    """argparse type: comma-separated integers ≥ ``low`` (``cli.lists.int_list``: no empty or repeated item)."""
    from llmcomp.cli.lists import int_list

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = int_list(text, "the list", example, allow_empty=allow_empty)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"must be integers ≥ {low}, e.g. {example}; got {text!r}")
        return values

    return parse


def names(choices, allow_empty: bool = False):
    """argparse type: comma-separated names, each one of ``choices`` (a bad one was a traceback mid-run)."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        items = [n.strip() for n in text.split(",")] if text.strip() or not allow_empty else []
        if "" in items:  # (as cli.lists.int_list: a trailing comma is a mistake named, not an unknown name '')
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item; give comma-separated names")
        bad = [n for n in items if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def tuples(size: int, sep: str, join: str, example: str, allow_empty: bool = False):
    """argparse type: groups of ``size`` positive integers joined by ``sep``, the groups joined by ``join``."""
    def parse(text: str) -> list[tuple[int, ...]]:
        if allow_empty and not text.strip():
            return []
        try:
            out = [tuple(int(v) for v in s.lower().split(sep)) for s in text.split(join)]
        except ValueError:
            out = None
        if not out or any(len(t) != size or min(t) < 1 for t in out):
            raise argparse.ArgumentTypeError(f"must look like {example}, got {text!r}")
        return out

    return parse


def shapes(allow_empty: bool = False):
    """argparse type: layer shapes N x K, comma-separated (``4096x4096,14336x4096``), each side ≥ 1."""
    return tuples(2, "x", ",", "4096x4096,14336x4096 (N x K ≥ 1)", allow_empty)


def launches(sep: str = ".", join: str = ",", example: str = "1.4.1,2.4.1"):
    """argparse type: kernel launches, three positive integers joined by ``sep`` (rt.warps.wr), joined by ``join``."""
    return tuples(3, sep, join, example)


def check(ap: argparse.ArgumentParser, validate, *args, **kwargs):
    """``validate(*args, **kwargs)`` (a library check raising UserError), its UserError as ``ap.error``."""
    try:
        return validate(*args, **kwargs)
    except UserError as exc:
        ap.error(str(exc))


def unknown(ap: argparse.ArgumentParser, names, known, what: str = "rows", hint: str = "") -> None:
    """``ap.error`` naming every one of ``names`` not in ``known`` (a mistyped ``--only`` name measured nothing and
    exited 0, or wrote over --out)."""
    known = list(known)
    bad = [n for n in names or () if n not in known]
    if bad:
        ap.error(f"unknown {what} {bad}; choose from {known}{hint}")


def writable(ap: argparse.ArgumentParser, path, flag: str = "--out") -> None:
    """``ap.error`` where ``path`` could not be written at the end of the run (``paths.check_report``, the CLI's
    check: a directory, a folder that cannot be made, a file an llmcomp artifact's load reads). Nothing is made here
    (the folder was: a run refused later, on a machine without a GPU, left it empty); the write makes it."""
    from llmcomp.core.paths import check_report

    check(ap, check_report, path, flag, folders=True)


def results(ap: argparse.ArgumentParser, path: Path, rows: type = list, flag: str = "--out",
            write: bool = True) -> dict | None:
    """``--out`` read before any work: its JSON (a dict whose ``rows`` is a ``rows``: a list of dicts with a
    ``name``, or a dict), None where it does not exist yet; ``ap.error`` where it could not be read back or
    (``write``) written (``writable``), or is a device or a pipe (no rows to merge; reading /dev/stdout back blocked
    for good). Without ``write``, an input that must exist (a pipe included: ``<(cat rows.json)``)."""
    if write:
        writable(ap, path, flag)
        from llmcomp.core.paths import is_special

        if is_special(path):  # (read back first: /dev/stdout, a terminal or the pipe it writes to, blocked for good)
            ap.error(f"{flag} {path} is a device or a pipe; this script merges its rows into the results file there "
                     "(a re-run keeps the rows it does not measure): give a file")
    if not path.exists():
        if not write:
            ap.error(f"{flag} {path} does not exist")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # (UnicodeDecodeError is a ValueError)
        ap.error(f"{flag} {path} is not a readable JSON results file ({str(exc).splitlines()[0]}); "
                 f"give another {flag}")
    got = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(got, rows) or (rows is list and not all(isinstance(r, dict) and "name" in r for r in got)):
        ap.error(f"{flag} {path} holds no results of this script (a JSON object with its 'rows'); give another {flag}")
    return data


def needs_cuda(ap: argparse.ArgumentParser, what: str = "times CUDA kernels") -> None:
    """Exit 2 with one line where no CUDA GPU is visible (the script's first CUDA call was a traceback)."""
    import torch

    if not torch.cuda.is_available():
        ap.exit(2, f"{ap.prog}: error: it {what} and needs a CUDA GPU; none is visible to torch here.\n")


def needs_triton(ap: argparse.ArgumentParser) -> None:
    """Exit 2 with one line where Triton is not importable (the GPU machine has it)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        ap.exit(2, f"{ap.prog}: error: it needs Triton (the GPU machine's), which is not installed here.\n")


def one_line_errors(main):
    """``main`` with a UserError (the library's refusal of an input, raised during the run) as one line on stderr
    and exit 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"{Path(main.__code__.co_filename).name}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped
