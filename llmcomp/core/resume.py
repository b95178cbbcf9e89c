"""Resumable layer-by-layer quantization.

A calibrated ``quantize`` saves each finished decoder layer's quantized linears (packed tensors, formats,
metrics) to ``.<output>.resume/layer-NNNN.safetensors`` beside the output, each file written to a temp
name and renamed into place, so a kill at any moment leaves only complete files. Restarting the same
command (same model weights and model config, method config, calibration tokens and settings, device kind
and llmcomp version: the ``fingerprint``) restores finished layers instead of recomputing them; the
calibration driver still runs each restored layer forward, which reproduces the next layer's inputs exactly
(same weights, same arithmetic), so the resumed run writes the same weights, byte for byte, as an
uninterrupted one. The directory is removed once the artifact is complete; a different fingerprint discards
it. A lock file beside it keeps a second process from using it while a job runs. Saved state that depends on
settings the fingerprint leaves out carries them as its own key (``save_state(key=)``, ``Checkpoint.drop_stale``):
a rerun that changes only those redoes that state alone (linearize keys its directory by what the attention
transfer reads, and its fine-tune's checkpoint carries the fine-tune's settings).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from llmcomp.core.config import from_dict, to_dict
from llmcomp.core.model import set_submodule
from llmcomp.core.paths import job_lock, save_tensors, write_report
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError

FINGERPRINT_FILE = "job.json"
ELAPSED_FILE = "elapsed.json"  # the seconds the job's runs spent up to their last saved work (``mark_time``)
KEY_META = "key"  # the metadata entry of saved state that carries its own key (``save_state``, ``drop_stale``)


def fingerprint(**parts) -> str:
    """The job's key: its settings, and the code that computes it (a resume after an upgrade mixed two versions'
    layers, since ``__version__`` stays 0.1.0 between commits)."""
    import transformers

    code = {"llmcomp": _source_digest(), "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps({**parts, "_code": code}, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*"), key=lambda f: f.relative_to(root).as_posix()):
        if f.suffix in (".py", ".cu", ".cuh") and f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _kill_point(tag: str) -> None:
    """Tests: ``LLMCOMP_TEST_KILL_AT=<tag>`` makes the process SIGKILL itself here (real kills)."""
    if os.environ.get("LLMCOMP_TEST_KILL_AT") == tag:
        os.kill(os.getpid(), 9)


def save_state(tensors: dict, path: Path, metadata: dict, before_rename: Optional[str] = None,
               key: Optional[str] = None) -> None:
    """``tensors`` to ``path`` whole or not at all, and on disk before the rename (a power loss left a renamed,
    empty file, which failed every rerun). ``key``: the settings the state depends on beyond its directory's
    fingerprint (``Checkpoint.drop_stale``)."""
    path = Path(path)
    if key is not None:
        metadata = {**metadata, KEY_META: key}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_tensors(tensors, tmp, metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except BaseException:  # (a full disk's partial file: not work a rerun could use)
        tmp.unlink(missing_ok=True)
        raise
    if before_rename:
        _kill_point(before_rename)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # (the rename itself; not every file system syncs a directory)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _saved_key(path: Path) -> Optional[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(KEY_META)
    except Exception:  # (damage: no key, so not this job's state)
        return None


def _readable(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
            list(f.keys())
        return True
    except Exception:  # (safetensors' own error, an OSError, a header that is not JSON: any damage)
        return False


OPENED: list[list] = []  # [directory, finished] of every Checkpoint this process made, in order (``unfinished``)


def unfinished(since: int = 0) -> list[Path]:
    """The resume directories of this process's Checkpoints after the first ``since`` (``len(OPENED)`` before a
    command) that were not finished and hold work: what an interrupted or failed command leaves to resume from."""
    left = [d for d, finished in OPENED[since:] if not finished]
    try:  # (saved state only: a partial .tmp is not work, and the error path must not raise)
        return [d for d in dict.fromkeys(left) if d.is_dir() and any(d.glob("*.safetensors"))]
    except OSError:
        return []


def drop_idle(since: int = 0) -> None:
    """Remove the unfinished resume directories opened after the first ``since`` that hold no work (a job stopped
    before its first saved state: only its fingerprint there)."""
    for d in dict.fromkeys(d for d, finished in OPENED[since:] if not finished):
        try:
            if d.is_dir() and not d.is_symlink() and not any(d.glob("*.safetensors")):
                shutil.rmtree(d)
        except OSError:  # (the error path must not raise)
            pass


class Checkpoint:
    def __init__(self, directory: Path, key: str, note=lambda msg: None, output: Optional[Path] = None,
                 cpu: bool = False):
        self.dir = Path(directory)
        self.key = key
        # one job at a time a directory: a second one would discard this one's layers, or mix them with its own
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(job_lock(output or self.dir, self.dir.with_name(self.dir.name + ".lock")))
        stamp = self.dir / FINGERPRINT_FILE
        if self.dir.exists():
            try:
                same = json.loads(stamp.read_text()).get("fingerprint") == key
            except (OSError, ValueError):
                same = False
            if not same:
                note(f"Discarding {self.dir} (from a different job)")
                try:  # (ignoring errors kept a folder it could not remove, and resumed the other job's layers)
                    if self.dir.is_symlink():
                        self.dir.unlink()
                    else:
                        shutil.rmtree(self.dir)
                except OSError as exc:
                    raise UserError(f"Could not discard {self.dir}, the resume state of another job "
                                    f"({exc.strerror or exc}); remove it, then run again.") from None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._opened = [self.dir, False]
        OPENED.append(self._opened)
        self._drop_damaged(note)
        if not stamp.exists():
            tmp = stamp.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": key, "threads": torch.get_num_threads()}))
            os.replace(tmp, stamp)
        self.t0 = time.perf_counter()
        try:  # (a resumed run's wall time counts the earlier runs': it showed only the last one's seconds)
            self.earlier_s = float(json.loads((self.dir / ELAPSED_FILE).read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            self.earlier_s = 0.0
        self.resumed = sorted(p.stem for p in self.dir.glob("layer-*.safetensors"))
        if self.resumed:
            note(f"Resuming: {len(self.resumed)} finished layer(s) in {self.dir}")
            if cpu:
                _note_threads(stamp, note)

    def _drop_damaged(self, note) -> None:
        """Files that do not read (a crash's half-written state) are dropped with a note and computed again — with
        the layers after a damaged one, so the resumed layers stay a prefix. They failed every rerun."""
        layers = sorted(self.dir.glob("layer-*.safetensors"))
        bad = next((i for i, f in enumerate(layers) if not _readable(f)), None)
        damaged = (layers[bad:] if bad is not None else []) + [
            f for f in self.dir.glob("*.safetensors") if not f.name.startswith("layer-") and not _readable(f)]
        for f in damaged:
            f.unlink()
        if damaged:
            note(f"Dropping {len(damaged)} damaged resume file(s) in {self.dir} ({damaged[0].name}); they are "
                 "computed again")

    def drop_stale(self, name: str, key: str) -> bool:
        """Remove the saved state ``name`` unless ``save_state`` stamped it with ``key``; whether it was removed.
        State that depends on settings the directory's fingerprint leaves out carries them as its own key, so a
        rerun that changes only those redoes that state alone and keeps the rest of the job's work."""
        path = self.dir / name
        if not path.exists() or _saved_key(path) == key:
            return False
        path.unlink()
        return True

    def _file(self, index: int) -> Path:
        return self.dir / f"layer-{index:04d}.safetensors"

    def has(self, index: int) -> bool:
        return self._file(index).exists()

    def save(self, model: nn.Module, index: int, names: list[str], report: dict) -> None:
        tensors, formats, bias = {}, {}, []
        for name in names:
            mod = model.get_submodule(name)
            if not isinstance(mod, QuantLinear):
                continue
            formats[name] = to_dict(mod.fmt)
            for buf, t in mod.packed_tensors().items():
                tensors[f"{name}.{buf}"] = t.detach().cpu().contiguous()
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
                bias.append(name)
        meta = {"formats": json.dumps(formats), "bias": json.dumps(bias),
                "report": json.dumps({n: report[n] for n in names if n in report})}
        save_state(tensors, self._file(index), meta, before_rename=f"before-rename-{index}")
        self.mark_time()
        _kill_point(f"after-layer-{index}")

    def mark_time(self, name: str = ELAPSED_FILE) -> None:
        """Record the job's seconds so far (the earlier runs' and this one's) beside the work just saved; ``name``:
        a mark of its own, the point ``rewind_time`` returns to."""
        write_report(self.dir / name, json.dumps({"seconds": self.earlier_s + time.perf_counter() - self.t0}))

    def rewind_time(self, name: str) -> None:
        """Count the earlier runs' seconds up to their ``mark_time(name)`` only: what they did after it was dropped
        (``drop_stale``) and is done again, so its seconds are not the result's (none where there is no such mark)."""
        try:
            self.earlier_s = float(json.loads((self.dir / name).read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def restore(self, model: nn.Module, index: int, report: dict) -> None:
        with safe_open(str(self._file(index)), framework="pt") as f:
            meta = f.metadata()
            formats = json.loads(meta["formats"])
            bias = set(json.loads(meta["bias"]))
            report.update(json.loads(meta["report"]))
            for name, spec in formats.items():
                fmt = from_dict(spec)
                old = model.get_submodule(name)
                device = old.weight.device if hasattr(old, "weight") else None
                packed = {k[len(name) + 1:]: f.get_tensor(k).to(device)
                          for k in f.keys() if k.startswith(name + ".") and k[len(name) + 1:] in
                          fmt.param_specs(1, old.in_features)}
                b = f.get_tensor(f"{name}.bias").to(device) if name in bias else None
                set_submodule(model, name, QuantLinear.from_packed(fmt, packed, old.in_features, b,
                                                                  out_features=old.out_features))

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._opened[1] = True
        self._lock.close()  # (the lock file goes with the last holder in this process)


def _note_threads(stamp: Path, note) -> None:
    """A CPU job resumed under another thread count: its float sums round differently there, so the weights are not
    the bytes of an uninterrupted run (the work is kept: a rerun on a machine of another size lost hours of it)."""
    try:
        then = json.loads(stamp.read_text()).get("threads")
    except (OSError, ValueError):
        return
    now = torch.get_num_threads()
    if isinstance(then, int) and then != now:
        note(f"The finished layers ran under {then} CPU threads and this run has {now}: the weights may differ in "
             f"rounding from an uninterrupted run's (OMP_NUM_THREADS={then} gives the same bytes).")


def for_output(output: Path, key: str, note=lambda msg: None, device=None) -> Optional[Checkpoint]:
    cpu = device is None or torch.device(device).type == "cpu"
    return Checkpoint(output.parent / f".{output.name}.resume", key, note, output=output, cpu=cpu)
