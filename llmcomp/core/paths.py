"""Cache locations and atomic directory writes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from llmcomp.errors import UserError


def cache_dir() -> Path:
    """``$LLMCOMP_CACHE`` or ``~/.cache/llmcomp``; a UserError naming where it comes from if it cannot be one."""
    env = os.environ.get("LLMCOMP_CACHE")
    root = env or os.path.join(os.path.expanduser("~"), ".cache", "llmcomp")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = "LLMCOMP_CACHE" if env else "the default cache directory"
        raise UserError(f"Cache directory {path} ({where}) cannot be used: {exc.strerror or exc}; "
                        f"set LLMCOMP_CACHE to a writable directory.") from None
    return path


def check_output(output, overwrite: bool, source=None) -> Path:
    """``output`` as a Path; refused where it exists (without ``overwrite``) or would replace ``source`` (the
    artifact a command reads: the output is that directory or a folder above it)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"Output {output} is a file; the output is a directory — choose another path.")
    above = next((p for p in output.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"Output {output} is under {above}, which is a file; choose another path.")
    if output.exists() and not overwrite:
        raise UserError(f"Output {output} already exists; choose another path or pass --overwrite.")
    if source is not None and Path(source).exists() and (
            output.resolve() == Path(source).resolve() or output.resolve() in Path(source).resolve().parents):
        raise UserError(f"Output {output} would replace the artifact {source}; choose another directory.")
    return output


def check_report(path, flag: str) -> None:
    """A report file a command writes at its end (``--json``, ``--junit``, a baseline): refused before any work
    where it could not be written then (its folder missing, or the path a directory)."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path.")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: its folder {path.parent} does not exist.")


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success rename it to ``dest``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``dest`` is
    untouched. With ``overwrite`` an existing ``dest`` is replaced only after the new one is complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _publish_permissions(tmp)
        if dest.exists():
            if not overwrite:
                raise FileExistsError(dest)
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "x")
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish_permissions(path: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the usual umask-derived modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
