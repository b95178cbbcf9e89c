"""Cache locations, atomic directory writes and safetensors file writes."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Optional

from llmcomp.errors import UserError


def save_tensors(tensors: dict, path, metadata: Optional[dict] = None) -> None:
    """safetensors' ``save_file``, its write errors (a full disk) as the OSError they are: the CLI's one line for a
    machine's failure, not a traceback (safetensors raises its own SafetensorError)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise OSError(errno.ENOSPC if "No space left" in text else errno.EIO, text, str(path)) from None


def cache_path() -> Path:
    """Where the cache is (``cache_dir`` without making it)."""
    env = os.environ.get("LLMCOMP_CACHE")
    try:
        return Path(env).expanduser() if env else Path.home() / ".cache" / "llmcomp"
    except RuntimeError:  # (no HOME and no passwd entry, e.g. a container run under an arbitrary uid)
        raise UserError("No home directory to hold the cache (HOME is unset); set LLMCOMP_CACHE to a writable "
                        "directory.") from None


def cache_dir() -> Path:
    """``$LLMCOMP_CACHE`` or ``~/.cache/llmcomp``; a UserError naming where it comes from if it cannot be one."""
    env = os.environ.get("LLMCOMP_CACHE")
    path = cache_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = "LLMCOMP_CACHE" if env else "the default cache directory"
        raise UserError(f"Cache directory {path} ({where}) cannot be used: {exc.strerror or exc}; "
                        f"set LLMCOMP_CACHE to a writable directory.") from None
    return path


def blank_path(text: str) -> str:
    """What is wrong with a path given as ``text`` that names nothing ("is empty", "is only spaces"), or ''."""
    return "is empty" if not text else "is only spaces" if not text.strip() else ""


def as_path(value, what: str) -> Path:
    """``value`` (a str or os.PathLike) as a Path with ``~`` expanded; a UserError for anything else (a library
    caller passing a loaded model or a number got a TypeError from pathlib)."""
    if not isinstance(value, (str, os.PathLike)):
        hint = "; save it with save_pretrained and pass its folder" if hasattr(value, "state_dict") else ""
        raise UserError(f"{what} must be a path (a str or os.PathLike), got {type(value).__name__}{hint}.")
    blank = blank_path(os.fspath(value))
    if blank:  # (Path('') is Path('.'): an empty path read as the current folder)
        raise UserError(f"{what} path {blank}; give a path.")
    try:
        return Path(value).expanduser()
    except RuntimeError:  # (~user of no such user: "Could not determine home directory", a traceback)
        raise UserError(f"{what} {os.fspath(value)}: '~' names no home directory here; write the path out.") from None


OUTPUT_MARK = ".llmcomp-output"  # in every directory ``atomic_dir`` publishes: what --overwrite may replace


def _bundled_copy() -> Optional[Path]:
    """The bundled model's converted copy in the cache, resolved (None where there is no cache)."""
    from llmcomp.core.model import BUNDLED_NAME  # (model imports this module)

    try:
        return (cache_path() / "models" / BUNDLED_NAME).resolve()
    except UserError:
        return None


SIBLING_EXTRA = len("..resume.lock")  # the longest name written beside an output: .NAME.resume.lock (.NAME.tmp-*: 14)


def check_name_length(output: Path) -> None:
    """An output name too long for its siblings (the temporary copy, the resume lock): "File name too long" from
    the lock file's open, not from the name the user gave."""
    folder = next((p for p in output.absolute().parents if p.is_dir()), None)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX") if folder is not None else 255
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(output.name))
    if size + SIBLING_EXTRA + 1 > limit:
        raise UserError(f"Output name {output.name[:24]}… is {size} bytes; llmcomp writes beside it "
                        f"(.NAME.tmp-XXXXXXXX, .NAME.resume.lock) within this filesystem's {limit}-byte names, so "
                        f"give at most {limit - SIBLING_EXTRA - 1} bytes.")


def check_output(output, overwrite: bool, source=None) -> Path:
    """``output`` as a Path; refused where it exists (without ``overwrite``), would replace ``source`` (the
    model or artifact a command reads: the output is that directory or a folder above it), or — with
    ``overwrite`` — is a directory llmcomp did not write (``--overwrite`` never deletes other files). ``~`` in
    either is the home directory, as the shell would make it (an API call's path does not pass a shell)."""
    if not isinstance(overwrite, bool):  # ("no" was truthy: the output was replaced)
        raise UserError(f"overwrite must be True or False, got {overwrite!r}.")
    output = as_path(output, "The output")
    source = as_path(source, "The model") if source is not None else None
    if output.is_symlink() and not output.exists():
        raise UserError(f"Output {output} is a broken symbolic link; remove it or choose another path.")
    if output.exists() and not output.is_dir():
        raise UserError(f"Output {output} is a file; the output is a directory — choose another path.")
    above = existing_parent(output)
    if not above.is_dir():
        what = "a broken symbolic link" if above.is_symlink() else "a file"
        raise UserError(f"Output {output} is under {above}, which is {what}; choose another path.")
    check_name_length(output)
    restored = recover_swaps(output)
    if output.exists() and not overwrite:
        why = " (put back: an --overwrite of it was killed mid-swap)" if restored else ""
        raise UserError(f"Output {output} already exists{why}; choose another path or pass --overwrite.")
    if source is not None and Path(source).exists() and (
            output.resolve() == Path(source).resolve() or output.resolve() in Path(source).resolve().parents):
        raise UserError(f"Output {output} would replace the input {source}; choose another directory.")
    bundled = _bundled_copy()
    if bundled is not None and (output.resolve() == bundled or bundled in output.resolve().parents):
        raise UserError(f"Output {output} would replace the bundled model's converted copy ({bundled}); choose "
                        "another path.")
    if output.exists():
        if os.path.ismount(output):
            raise UserError(f"Output {output} is a mount point, which --overwrite cannot replace; write to a "
                            "directory inside it.")
        if not written_by_llmcomp(output):
            raise UserError(f"Output {output} exists and was not written by llmcomp (no {OUTPUT_MARK} mark; exports "
                            "from llmcomp releases before the mark have none); --overwrite replaces only llmcomp's "
                            "own outputs — remove it yourself or choose another path.")
    return output


def written_by_llmcomp(path: Path) -> bool:
    """An empty directory, or one ``atomic_dir`` published: its mark, or from before the mark an artifact (its
    manifest) or a report (``report.md`` and plots only)."""
    names = {p.name for p in path.iterdir()}
    return (not names or OUTPUT_MARK in names or (path / "llmcomp.json").is_file()
            or ("report.md" in names and all(n == "report.md" or n.endswith(".png") for n in names)))


def existing_parent(path) -> Path:
    """The nearest folder above ``path`` that is there (its own, where it is; ``.`` last for a relative path): where
    a write that makes the missing folders makes them — or a file or a broken symbolic link, under which none can be
    made (a broken link was passed over: the check passed, and the write's mkdir failed on it after the run)."""
    return next((p for p in Path(path).parents if os.path.lexists(p)), Path(path))  # (the path itself: / or .)


def check_report(path, flag: str, reads=(), writes=(), folders: bool = False) -> None:
    """A report file a command writes at its end (``--json``, ``--junit``, a baseline): refused before any work
    where it could not be written then (its folder missing, or the path a directory), or where it would overwrite
    what the command reads (``reads``: model directories, artifacts, a baseline; None entries skipped) — a file
    of a model directory (its manifest, config, weights, tokenizer) or the baseline itself — or another of its
    reports (``writes``: {path: flag}); nor where it is such a file of any llmcomp artifact (``bench kernels -o
    ART/llmcomp.json`` reads no model) or of the bundled model's converted copy. Other files beside a model are
    fine (``cd ART && llmcomp check . --update`` keeps its baseline there). ``folders``: the write makes missing
    folders (``write_json``): they are fine where the nearest folder there takes new files, and nothing is made here
    (a run that failed later left them empty)."""
    if path is None:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path.")
    if not (folders or path.parent.is_dir()):
        raise UserError(f"{flag} {path}: its folder {path.parent} does not exist.")
    why = unwritable(path)
    if why:  # (a read-only mount, no permission: the write failed after the whole evaluation)
        raise UserError(f"{flag} {path} cannot be written: {why}.")
    target = path.resolve()
    for other, by in dict(writes).items():
        if other is not None and Path(other).expanduser().resolve() == target:
            raise UserError(f"{flag} {path} is where {by} writes too; give them different paths.")
    for read in reads:
        if read is None:
            continue
        read = Path(read).expanduser().resolve()
        if target == read or (target.parent == read and _model_file(read, target.name)):
            raise UserError(f"{flag} {path} would overwrite {target}, which this command reads; write it elsewhere.")
    from llmcomp.core.artifact import is_artifact

    if is_artifact(target.parent) and _model_file(target.parent, target.name):
        raise UserError(f"{flag} {path} would write {target.name} into the llmcomp artifact {target.parent}, whose "
                        "loads read that file; write it elsewhere.")
    if target.parent == _bundled_copy() and _model_file(target.parent, target.name):  # (no manifest: no artifact)
        raise UserError(f"{flag} {path} would write {target.name} into the bundled model's converted copy "
                        f"({target.parent}), which every run of the bundled model reads; write it elsewhere.")


def unwritable(path: Path) -> str:
    """Why ``write_report`` could not write ``path`` (its folder takes no new file — where it is not there yet, the
    nearest one above that ``write_json`` would make it in; a device or pipe refuses writes; a socket, which ``open``
    cannot write: ENXIO after the work, unless it is the command's own stdout; a directory, which a write would try to
    replace), as the system says it, or ''. A file is made and removed there, as the write will (``os.access``
    answers for the permission bits, not for what root may not create: /proc, an NFS root squash)."""
    import sys

    path = Path(path)
    if path.is_dir():  # (its folder takes new files: it passed, only its callers refusing one first)
        return "it is a directory"
    if is_special(path):
        if stat.S_ISSOCK(path.stat().st_mode) and not _same_file(path, sys.stdout):
            return "it is a socket; give a file, a device or a pipe"
        return "" if os.access(path, os.W_OK) else f"{os.strerror(errno.EACCES)} ({path})"
    folder = existing_parent(path)
    if folder.is_symlink() and not folder.exists():  # (mkstemp's ENOENT named no cause)
        return f"{folder} is a broken symbolic link"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return f"{exc.strerror or exc} ({folder})"
    os.close(fd)
    os.unlink(tmp)
    return ""


def write_json(path, data, partial: bool = False) -> None:
    """``data`` as indented JSON at ``path`` (``~`` expanded, its folder made for library callers), whole or not
    at all: a bench run writes its results after every row, and one killed mid-write kept a truncated file.
    ``partial``: such an intermediate write, skipped where ``path`` is a device or a pipe (each write there is one
    more document, and a named pipe's reader has gone after the first: the next open blocked)."""
    path = Path(path).expanduser()
    if partial and is_special(path):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(path, json.dumps(data, indent=1))


def write_report(path, text: str, mode: Optional[int] = None) -> None:
    """Write a small file whole or not at all (a temporary sibling ``.NAME.*.tmp`` renamed into place: a kill
    during a write left a truncated baseline). ``mode``: its permissions (default: the umask's, as ``open`` gives;
    mkstemp's file is 0600). A device or a pipe (``--json /dev/stdout``) is written into: renaming a file onto it
    put a regular file in place of /dev/stdout or /dev/null (as root; another user's rename failed after the work)."""
    path = Path(path).expanduser()
    if is_special(path):
        import sys

        sys.stdout.flush()  # (what the command printed comes first where the device is its own stdout)
        if _same_file(path, sys.stdout):  # (through stdout itself: another descriptor on a file the shell opened
            sys.stdout.write(text)        # with `>` kept its own offset, and later output overwrote the report)
            sys.stdout.flush()
            return
        with open(path, "a") as fh:  # (appended: "w" would cut short a file the shell sent stdout to)
            fh.write(text)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_file(path: Path, stream) -> bool:
    """Whether ``path`` (its links followed) is the file ``stream`` writes to."""
    try:
        a, b = os.stat(path), os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # (a stream without a descriptor: pytest's capture, StringIO)
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def is_special(path: Path) -> bool:
    """Whether ``path`` is there and, its links followed, is neither a regular file nor a directory (a device, a pipe,
    a socket), or is an open descriptor's link (/dev/stdout → /proc/self/fd/1, a file the shell redirected stdout to
    included): what a report is written into rather than replaced."""
    try:
        mode = Path(path).stat().st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or _descriptor_link(Path(path))


def _descriptor_link(path: Path) -> bool:
    """Whether ``path`` or a link it goes through is an entry of /proc/PID/fd (also as /dev/fd/N, /dev/stdout)."""
    p = Path(os.path.abspath(path))
    for _ in range(40):  # (the kernel's own limit on links followed)
        if re.fullmatch(r"/proc/[^/]+/fd", os.path.realpath(p.parent)):
            return True
        if not p.is_symlink():
            return False
        p = Path(os.path.abspath(p.parent / os.readlink(p)))
    return False


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _model_file(folder: Path, name: str) -> bool:
    """Whether ``name`` is a file a load of the model or artifact in ``folder`` reads."""
    from llmcomp.core.artifact import INDEX, MANIFEST
    from llmcomp.core.model import TOKENIZER_FILES

    if name in (MANIFEST, INDEX, "config.json", "generation_config.json", "special_tokens_map.json",
                "added_tokens.json", "merges.txt", "chat_template.jinja", *TOKENIZER_FILES) \
            or name.endswith(".safetensors"):
        return True
    try:  # (an artifact lists every file it wrote)
        return name in json.loads((folder / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False


PUBLISHED: list[Path] = []  # the outputs ``atomic_dir`` published in this process, in order (the CLI's interrupt line)


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = False, output: bool = True):
    """Yield a temporary sibling directory; on success rename it to ``dest``.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``dest`` is
    untouched. With ``overwrite`` an existing ``dest`` is replaced only after the new one is complete
    (and put back where the last rename fails). ``output``: a command's output, listed in ``PUBLISHED`` once in
    place (not a cache entry, such as the bundled model's converted copy).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        with locked(tmp):  # (held until it is published: what tells a live one from a killed job's)
            yield tmp
            _publish(tmp, dest, overwrite)
            if output:
                PUBLISHED.append(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    (tmp / OUTPUT_MARK).touch()
    _publish_permissions(tmp)
    if not dest.exists():
        try:
            os.rename(tmp, dest)
            return
        except OSError:
            if not dest.exists():
                raise
    if not overwrite:  # another job published it while this one ran
        raise UserError(f"Output {dest} was written by another job while this one ran; nothing was replaced "
                        "— choose another path or pass --overwrite.")
    _replace(tmp, dest)


STALE_AFTER_S = 60.0  # a younger temporary directory may be one another writer has made and not yet locked
EXCLUSIVE_STALE_AFTER_S = 2.0  # the same, found by a job that holds the output's job lock (``_sweep_stale``)


def _sweep_stale(dest: Path) -> None:
    """Remove the temporary directories of killed writes of ``dest`` (SIGKILL, a lost machine: full-size and
    hidden, they stayed for good): each one no process holds locked, older than ``STALE_AFTER_S``. Not where the
    filesystem cannot lock, and not while an ``.old-`` sibling exists — a write killed during ``_replace`` may
    have the only copies there."""
    try:
        import fcntl
    except ImportError:
        return
    recover_swaps(dest)
    if _siblings(dest, "old"):
        return
    # (the age spares a writer between its mkdtemp and its lock; a job holding dest's job lock has no such rival
    # among the jobs, so a killed job's folder goes on the rerun right after it: seconds, for a library writer
    # that takes no job lock)
    young_s = EXCLUSIVE_STALE_AFTER_S if os.path.realpath(job_lockfile(dest)) in _HELD else STALE_AFTER_S
    now = time.time()
    for stale in _siblings(dest, "tmp"):
        try:
            info = stale.lstat()
        except OSError:
            continue
        young = now - info.st_mtime < young_s
        if not stat.S_ISDIR(info.st_mode) or young or os.path.realpath(stale) in _HELD:
            continue
        try:  # (not ``_take``: a path that went meanwhile must not come back as a lock file)
            fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # another process is writing it, or no locks on this filesystem
            os.close(fd)
            if exc.errno in _NO_LOCKS:  # nothing tells a live write from a dead one
                return
            continue
        try:
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            os.close(fd)


def _replace(new: Path, dest: Path) -> None:
    """Rename ``new`` onto the existing ``dest``: the old one aside first (``.old-*/x``, its folder locked for the
    swap), back in place if the swap fails; a process killed between the renames leaves it for ``recover_swaps``."""
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    with locked(old):
        try:
            os.rename(dest, old / "x")
        except BaseException:
            shutil.rmtree(old, ignore_errors=True)
            raise
        try:
            os.rename(new, dest)
        except BaseException:
            os.rename(old / "x", dest)
            shutil.rmtree(old, ignore_errors=True)
            raise
        os.rename(old / "x", old / "gone")  # (from here a kill leaves nothing to put back)
    shutil.rmtree(old, ignore_errors=True)


def _siblings(dest: Path, kind: str) -> list[Path]:
    """``dest``'s own ``.<name>.<kind>-XXXXXXXX`` folders as ``tempfile.mkdtemp`` names them (not those of an output
    whose name merely starts with ``<name>.old-``: ``.m.old-v1.old-abcd1234`` is ``m.old-v1``'s)."""
    shape = re.compile(rf"\.{re.escape(dest.name)}\.{kind}-[a-z0-9_]{{8}}")
    return sorted(p for p in dest.parent.glob(f".{glob.escape(dest.name)}.{kind}-*") if shape.fullmatch(p.name))


def recover_swaps(dest: Path) -> bool:
    """Finish what a write killed inside ``_replace`` left: where ``dest`` is missing, its previous version is put
    back from ``.<name>.old-*/x`` (True); where the new one is in place, the old copy goes. An ``.old-`` folder
    another process holds locked is a live swap and left alone; nothing is done where the filesystem cannot lock,
    and an empty one (just made, or its swap killed before the first rename) goes only once ``STALE_AFTER_S`` old."""
    try:
        import fcntl
    except ImportError:
        return False
    restored = False
    for old in _siblings(dest, "old"):
        try:
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:  # a live swap, or no locks here: nothing tells a dead one
                if exc.errno in _NO_LOCKS:
                    return restored
                continue
            info = os.fstat(fd)  # (the folder itself, even where its swap removed it meanwhile)
            kept = old / "x"
            if info.st_nlink == 0:  # removed by its own swap, or by another process's recovery
                continue
            if kept.is_dir() and not (dest.exists() or dest.is_symlink()):
                try:
                    os.rename(kept, dest)
                    restored = True
                except OSError as exc:  # another job published dest meanwhile: the old copy is superseded
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                        raise
            elif not (kept.exists() or (old / "gone").exists()) and time.time() - info.st_mtime < STALE_AFTER_S:
                continue
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)
    return restored


def job_lockfile(output: Path) -> Path:
    """The lock file every job writing ``output`` holds (``job_lock``), the resume directory's too."""
    return output.parent / f".{output.name}.resume.lock"


@contextlib.contextmanager
def job_lock(output: Path, lockfile: Optional[Path] = None):
    """One job at a time writes ``output``: a lock file beside it (``.<name>.resume.lock``, the resume directory's)
    for the whole job; a second process gets a UserError at once instead of doing all its work to find the output
    taken (or mixing its resume layers with the first one's)."""
    check_name_length(output)
    lockfile = lockfile or job_lockfile(output)
    with locked(lockfile, remove=True, busy=f"Another llmcomp job is writing {output} (it holds {lockfile}); wait "
                                            "for it to finish or choose another output path."):
        yield


_HELD: dict[str, list] = {}  # locks this process holds: real path → [fd, holders]
# Filesystems without flock; EBADF: NFS emulates flock by POSIX locks, which need a file open for writing (a
# directory cannot be)
_NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL, errno.EBADF)


@contextlib.contextmanager
def locked(path: Path, busy: Optional[str] = None, remove: bool = False):
    """An exclusive ``flock`` on ``path`` (a directory, or a file created if missing) against other processes,
    for the block. With ``busy``, a lock held by another process is that UserError at once; without, the
    block waits for it. ``remove``: the lock file is deleted when released (while still held, and a taker
    checks that it locked the file that is there, so no two processes ever hold "the" lock). Within one
    process the lock is shared (jobs there run one after another, and one that failed may still hold it).
    A no-op where there is no ``fcntl`` or the filesystem has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    key = os.path.realpath(path)
    if key not in _HELD:
        fd = _take(path, fcntl, busy)
        if fd is None:  # no locking on this filesystem
            yield
            return
        _HELD[key] = [fd, 0]
    _HELD[key][1] += 1
    try:
        yield
    finally:
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            os.close(entry[0])


def _take(path, fcntl, busy: Optional[str]) -> Optional[int]:
    """The fd of ``path`` locked by this process (None where the filesystem cannot lock)."""
    is_dir = Path(path).is_dir()
    while True:
        fd = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
            if is_dir or os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            raise UserError(busy) from None
        except FileNotFoundError:  # the holder removed it as we took it: take the new one
            pass
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file its holder has just removed: take the one there now


def _publish_permissions(path: Path) -> None:
    """mkdtemp makes 0700 directories; give the result the usual umask-derived modes."""
    umask = _umask()
    os.chmod(path, 0o777 & ~umask)
    for f in path.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
