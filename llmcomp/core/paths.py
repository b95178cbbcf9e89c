"""Cache locations and atomic directory writes."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMCOMP_CACHE`` or ``~/.cache/llmcomp``."""
    root = os.environ.get("LLMCOMP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmcomp")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
