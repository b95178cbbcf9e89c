"""Resumable layer-by-layer quantization.

A calibrated ``quantize`` saves each finished decoder layer's quantized linears (packed tensors, formats,
metrics) to ``.<output>.resume/layer-NNNN.safetensors`` beside the output, each file written to a temp
name and renamed into place, so a kill at any moment leaves only complete files. Restarting the same
command (same model weights and model config, method config, calibration tokens and settings, device kind
and llmcomp version: the ``fingerprint``) restores finished layers instead of recomputing them; the
calibration driver still runs each restored layer forward, which reproduces the next layer's inputs exactly
(same weights, same arithmetic), so the resumed run writes the same weights, byte for byte, as an
uninterrupted one. The directory is removed once the artifact is complete; a different fingerprint discards
it. A lock file beside it keeps a second process from using it while a job runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmcomp.core.config import from_dict, to_dict
from llmcomp.core.model import set_submodule
from llmcomp.core.paths import locked
from llmcomp.core.qlinear import QuantLinear

FINGERPRINT_FILE = "job.json"


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _kill_point(tag: str) -> None:
    """Tests: ``LLMCOMP_TEST_KILL_AT=<tag>`` makes the process SIGKILL itself here (real kills)."""
    if os.environ.get("LLMCOMP_TEST_KILL_AT") == tag:
        os.kill(os.getpid(), 9)


class Checkpoint:
    def __init__(self, directory: Path, key: str, note=lambda msg: None, output: Optional[Path] = None):
        self.dir = Path(directory)
        self.key = key
        # one job at a time a directory: a second one would discard this one's layers, or mix them with its own
        lockfile = self.dir.with_name(self.dir.name + ".lock")
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(locked(lockfile, remove=True, busy=(
            f"Another llmcomp job is writing {output or self.dir} (it holds {lockfile}); wait for it to "
            "finish or choose another output path.")))
        stamp = self.dir / FINGERPRINT_FILE
        if self.dir.exists():
            try:
                same = json.loads(stamp.read_text()).get("fingerprint") == key
            except (OSError, ValueError):
                same = False
            if not same:
                note(f"Discarding {self.dir} (from a different job)")
                shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            tmp = stamp.with_suffix(".tmp")
            tmp.write_text(json.dumps({"fingerprint": key}))
            os.replace(tmp, stamp)
        self.resumed = sorted(p.stem for p in self.dir.glob("layer-*.safetensors"))
        if self.resumed:
            note(f"Resuming: {len(self.resumed)} finished layer(s) in {self.dir}")

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
        final = self._file(index)
        tmp = final.with_name(final.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        _kill_point(f"before-rename-{index}")
        os.replace(tmp, final)
        _kill_point(f"after-layer-{index}")

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
        self._lock.close()  # (the lock file goes with the last holder in this process)


def for_output(output: Path, key: str, note=lambda msg: None) -> Optional[Checkpoint]:
    return Checkpoint(output.parent / f".{output.name}.resume", key, note, output=output)
