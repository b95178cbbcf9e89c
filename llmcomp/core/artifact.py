"""Artifacts: write (atomic, hashed) and read (verified) llmcomp model directories.

Layout::

    model.safetensors            packed tensors named <module>.<field> + untouched base tensors
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json past ``shard_bytes``)
    llmcomp.json                 the manifest (below)
    config.json, generation_config.json, tokenizer files    copied from the base model

Manifest (``llmcomp.json``)::

    schema_version, llmcomp_version, base_model {name, sha256}, text_source,
    stages [{method, config, wall_time_s, metrics}], modules {path: format spec},
    files {name: sha256}, manifest_sha256 (of all the above; evaluations [...] are appended after)
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from llmcomp.core.config import dumps, from_dict, to_dict
from llmcomp.core.hfcompat import fit_experts
from llmcomp.core.model import check_complete, load_tokenizer, place_tensor
from llmcomp.core.numeric import all_finite, storage_key
from llmcomp.core.paths import atomic_dir, check_output, locked, save_tensors, write_report
from llmcomp.core.qlinear import QuantLinear, untie_quantized_head
from llmcomp.core.registry import load_all
from llmcomp.formats.base import WeightFormat
from llmcomp.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "llmcomp.json"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 << 30


# Stage hooks: a manifest stage with a ``kind`` (e.g. "kv") is re-applied at load by the hook registered
# for it by a higher layer (llmcomp.prune.kv.hook) — core never imports those layers.
# ``skeleton(model, stage)`` runs on the meta skeleton before tensors load, ``ready(model, stage)`` after.
STAGE_HOOKS: dict = {}


def register_stage_hook(kind: str, hook) -> None:
    STAGE_HOOKS[kind] = hook


def _stage_hooks(manifest: dict) -> list:
    out = []
    for stage in manifest["stages"]:
        kind = stage.get("kind")
        if kind is None:
            continue
        if not isinstance(kind, str):
            raise UserError(f"Artifact stage {stage.get('method')!r} is corrupt: its kind {kind!r} is not a name.")
        if kind not in STAGE_HOOKS:
            load_all()
        if kind not in STAGE_HOOKS:
            raise UserError(f"Artifact stage {stage.get('method')!r} of kind {kind!r} is not supported by this llmcomp.")
        out.append((STAGE_HOOKS[kind], stage))
    return out


def llmcomp_version() -> str:
    from llmcomp import __version__

    return __version__


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST).exists()


def _unique_state(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The model's tensors, each storage once (tied weights are re-tied at load), on CPU. Empty tensors (an expert
    HEAPr emptied) all have storage address 0: each is its own, not a tie."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = storage_key(t)
        if key is not None and key in seen:
            continue
        seen.add(key)
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not _is_packed_field(name, model):
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def _check_finite(state: dict[str, torch.Tensor], dest: Path, dtype: Optional[torch.dtype]) -> None:
    """No artifact holds NaN or inf: a diverged fine-tune (linearize at a huge --lr) wrote one that every later
    command read as a model with NaN perplexity, exit status 0."""
    for name, t in state.items():
        if t.is_floating_point() and not all_finite(t):
            cast = f" once stored as {str(dtype).removeprefix('torch.')}" if dtype is not None else ""
            raise UserError(f"Not writing {dest}: tensor {name} holds NaN or inf values{cast}; the model it was "
                            "made from is not finite.")


def _dtype_misfit(got: torch.dtype, want: torch.dtype, packed: bool) -> bool:
    """Whether a stored tensor cannot stand for the skeleton's: a packed field's codes only in their own integer
    type (its bits are the layout); anything else only as the same kind (float for float), any width."""
    if packed and not want.is_floating_point:
        return got != want
    return got.is_floating_point != want.is_floating_point or (got == torch.bool) != (want == torch.bool)


def _is_packed_field(name: str, model: torch.nn.Module) -> bool:
    parent, _, field = name.rpartition(".")
    try:
        mod = model.get_submodule(parent)
    except AttributeError:
        return False
    return isinstance(mod, QuantLinear) and field in mod.packed_tensors()


def _save_shards(state: dict[str, torch.Tensor], tmp: Path, shard_bytes: int) -> None:
    shards, cur, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_tensors(shards[0], tmp / "model.safetensors", {"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, tmp / fname, {"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_artifact(
    dest: Path,
    model: torch.nn.Module,
    tokenizer,
    *,
    base_model: dict,
    stages: list[dict],
    text_source: Optional[str] = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write ``model`` as an artifact at ``dest`` (atomically). Returns ``dest``."""
    dest = check_output(dest, overwrite)
    text_source = stages_text(stages, text_source)
    modules = {n: to_dict(m.fmt) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = _unique_state(model, dtype)
    _check_finite(state, dest, dtype)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        _save_shards(state, tmp, shard_bytes)
        config = copy.deepcopy(model.config)  # config.json names the dtype its floating tensors are stored in
        config.dtype = dtype or _held_dtype(model)  # (transformers 4.56 kept a loaded config's dtype: bf16 over fp32)
        untie_quantized_head(model, config)
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except (ValueError, OSError):
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "llmcomp_version": llmcomp_version(),
            "base_model": base_model,
            "text_source": text_source,
            "stages": stages,
            "modules": modules,
            "files": files,
        }
        manifest[SEAL] = _seal(json.loads(dumps(manifest)))  # (of the manifest as it reads back: NaN as null)
        (tmp / MANIFEST).write_text(dumps(manifest, indent=1, sort_keys=True))
        read_manifest(tmp)  # verify before it becomes visible
    return dest


def stages_text(stages: list[dict], text_source: Optional[str] = None) -> Optional[str]:
    """The calibration texts every stage read, in order, with ``text_source`` (the new stage's): a stage that
    reads none (RTN over a moefied or calibrated artifact) wrote None, and inspect said no stage read text."""
    texts = [s["calibration"].get("text") for s in stages if isinstance(s.get("calibration"), dict)]
    return ", ".join(dict.fromkeys(t for t in [*texts, text_source] if isinstance(t, str) and t)) or None


def stage_kinds(manifest: dict) -> dict[str, str]:
    """``{kind: method}`` of a manifest's stages that change how the model runs (a KV policy, linear attention,
    MoE shapes, ...), in order, the first stage of each kind."""
    kinds: dict[str, str] = {}
    for stage in manifest["stages"]:
        if stage.get("kind") is not None:
            kinds.setdefault(stage["kind"], stage.get("method"))
    return kinds


def _held_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's unquantized tensors are in (its input embeddings')."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def stored_dtype(path: Path) -> Optional[torch.dtype]:
    """The floating dtype an artifact's config.json names (``dtype``, or ``torch_dtype`` as older transformers
    wrote it); None where it names none."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


SEAL = "manifest_sha256"


def _seal(manifest: dict) -> str:
    """sha256 of everything in the manifest but its evaluations (appended later, ``record_evaluation``) and the seal
    itself: the modules' formats and the stages' settings decide how the weights are read, so an edited manifest
    would load another model from intact weight files."""
    core = {k: v for k, v in manifest.items() if k not in ("evaluations", SEAL)}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: Path, verify: bool = True, hashes: bool = True) -> dict:
    """Read and (by default) verify an artifact's manifest and file hashes; UserError on any problem.
    ``hashes=False``: the manifest's seal and its files' presence only (a viewer's check: no file is hashed)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.exists():  # (a missing path and a file read "llmcomp.json is missing" too)
        why = "does not exist" if not path.exists() else "is a file" if not path.is_dir() else f"has no {MANIFEST}"
        raise UserError(f"{path} is not an llmcomp artifact: it {why}.")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):  # (JSONDecodeError; an int past 4300 digits; nesting)
        raise UserError(f"{mpath} is corrupt (not valid JSON).") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath} is corrupt: the manifest is not a JSON object.")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{mpath} has schema version {version!r}; this llmcomp reads version {SCHEMA_VERSION}.")
    for key, kind in (("files", dict), ("modules", dict), ("stages", list), ("base_model", dict)):
        if key not in manifest:
            raise UserError(f"{mpath} is missing its {key!r} entry.")
        if not isinstance(manifest[key], kind):
            raise UserError(f"{mpath} is corrupt: {key!r} is not a JSON {'object' if kind is dict else 'array'}.")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise UserError(f"{mpath} is corrupt: 'files' must map file names to sha256 strings.")
    for name, spec in manifest["modules"].items():  # (each a format the loader can build)
        try:
            if not (isinstance(spec, dict) and isinstance(spec.get("_type"), str)):
                raise UserError("not a format object")
            if not isinstance(from_dict(spec), WeightFormat):
                raise UserError(f"{spec['_type']} is not a weight format")
        except (UserError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{mpath} is corrupt: module {name!r} has no valid format ({e}).") from None
    for i, stage in enumerate(manifest["stages"], 1):
        if not (isinstance(stage, dict) and isinstance(stage.get("method"), str)
                and isinstance(stage.get("config", {}), dict) and isinstance(stage.get("metrics", {}), dict)):
            raise UserError(f"{mpath} is corrupt: stage {i} needs a 'method' name and 'config' / 'metrics' objects.")
    evaluations = manifest.get("evaluations", [])  # (outside the seal: appended by eval --record)
    if not (isinstance(evaluations, list) and all(isinstance(e, dict) for e in evaluations)):
        raise UserError(f"{mpath} is corrupt: 'evaluations' must be an array of result objects.")
    if verify:
        if SEAL in manifest and manifest[SEAL] != _seal(manifest):  # (artifacts written before the seal have none)
            raise UserError(f"{mpath} was edited after the artifact was written (its {SEAL} does not match); "
                            "re-create or re-copy the artifact.")
        # (the writer lists every file it wrote: weights, index and config unlisted mean an edited artifact)
        # (hidden files, e.g. macOS's ._model.safetensors copies, are never read)
        unlisted = [f.name for f in sorted(path.iterdir()) if f.is_file() and f.name not in manifest["files"]
                    and not f.name.startswith(".") and (f.suffix == ".safetensors" or f.name in (INDEX, "config.json"))]
        if unlisted:
            raise UserError(f"{mpath} has no checksum for {unlisted[0]}: the artifact was edited or is incomplete; "
                            "re-create or re-copy it.")
        for name, digest in manifest["files"].items():
            f = path / name
            if not f.exists():
                raise UserError(f"Artifact file {f} is missing.")
            if not f.is_file():  # (a folder under a listed name: an unsealed manifest edited by hand)
                raise UserError(f"Artifact file {f} is not a file; re-create or re-copy the artifact.")
            if hashes and sha256_file(f) != digest:
                raise UserError(f"Artifact file {f} is corrupt (sha256 mismatch); re-create or re-copy the artifact.")
    return manifest


_RECORDING = threading.Lock()  # (``locked`` is shared by the threads of a process)


def record_evaluation(path: Path, result: dict, seal: Optional[str] = None) -> None:
    """Append an evaluation result to the manifest's ``evaluations`` list (atomic replace). ``seal``: the
    manifest's seal when the evaluated model was loaded; a manifest sealed otherwise now is another artifact
    (an --overwrite while it was evaluated), and nothing is recorded.

    The manifest is not among the hashed files, so recording metrics leaves the artifact valid."""
    path = Path(path)
    # two evaluations recording at once (processes or threads): one after the other, neither lost
    with _RECORDING, locked(path):
        for stale in path.glob(f".{MANIFEST}.*.tmp"):  # a killed recording's (every writer holds the lock)
            stale.unlink(missing_ok=True)
        manifest = read_manifest(path, verify=False)
        if seal is not None and manifest.get(SEAL) != seal:
            raise UserError(f"{path} was replaced while it was evaluated; its results were not recorded.")
        manifest.setdefault("evaluations", []).append(result)
        write_report(path / MANIFEST, dumps(manifest, indent=1, sort_keys=True),
                     mode=os.stat(path / MANIFEST).st_mode & 0o777)


def weight_files(path: Path) -> list[Path]:
    path = Path(path)
    if (path / INDEX).exists():
        try:
            index = json.loads((path / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{path / INDEX} is corrupt (not a safetensors index).") from None
        bad = next((n for n in names if not isinstance(n, str) or n in ("", ".", "..") or "/" in n or "\\" in n), None)
        if bad is not None:  # (an entry "../other/model.safetensors" read weights no hash covered)
            raise UserError(f"{path / INDEX} is corrupt: its weight file {bad!r} is not a file name in the folder.")
        return [path / n for n in names]
    return [path / "model.safetensors"]


@contextlib.contextmanager
def open_weights(f: Path):
    """``safe_open`` of an artifact's weights file for reading; a damaged file (a bad header, cut short) is a
    UserError naming it (the sha256 check catches damage first, where the manifest has the file's digest)."""
    try:
        with safe_open(str(f), framework="pt") as sf:
            yield sf
    except SafetensorError as e:
        raise UserError(f"{f} is not a readable safetensors file ({str(e).splitlines()[0]}).") from None


_STAGE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError)


def _stage_misfit(path: Path, stage: dict, e: Exception) -> UserError:
    return UserError(f"{path / MANIFEST} is corrupt: its {stage.get('kind')} stage does not fit the model "
                     f"({type(e).__name__}: {e}).")


def build_skeleton(path: Path, manifest: dict):
    """The artifact's model on the meta device — stage hooks' structure and QuantLinear modules in place,
    no tensors loaded. Returns (model, [(hook, stage)])."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcomp.core.model import read_generation_config, set_submodule

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        # (float32 whatever config.json's dtype, the stored one: load(dtype=) casts, and a later stage reads float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    read_generation_config(model, path)
    hooks = _stage_hooks(manifest)
    for hook, stage in hooks:
        try:
            hook.skeleton(model, stage)
        except _STAGE_ERRORS as e:  # (an artifact read unverified, or written before the manifest's seal)
            raise _stage_misfit(path, stage, e) from None
    for name, spec in manifest["modules"].items():
        fmt = from_dict(spec)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not all(hasattr(old, a) for a in ("in_features", "out_features", "bias")):
            raise UserError(f"{path / MANIFEST} is corrupt: module {name!r} is not a linear layer of the model.")
        set_submodule(model, name, QuantLinear(old.in_features, old.out_features, fmt,
                                               bias=old.bias is not None, device="meta"))
    fit_experts(model)  # (after the stage hooks: a pruning stage may have narrowed the experts)
    return model, hooks


def load_artifact(path: Path, dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
                  device_map=None, verify: bool = True, max_memory=None, offload_folder=None,
                  strict_tokenizer: bool = True):
    """Build the model skeleton on meta, swap in QuantLinear modules, load tensors, place them
    (``device_map``/``max_memory``/``offload_folder``: accelerate, see ``core.memory.dispatch``)."""
    from llmcomp.core.memory import dispatch

    path = Path(path)
    manifest = read_manifest(path, verify=verify)
    model, hooks = build_skeleton(path, manifest)
    expected = {k: (t.shape, t.dtype) for k, t in model.state_dict().items()}
    loaded = set()
    for f in weight_files(path):
        if f.name not in manifest["files"]:  # (every file the load reads is one the manifest hashes)
            raise UserError(f"{path / INDEX} names {f.name}, which the manifest does not list; the artifact was "
                            "edited.")
        if not f.exists():
            raise UserError(f"Artifact file {f} is missing.")
        with open_weights(f) as sf:
            for key in sf.keys():
                if key not in expected:
                    raise UserError(f"Artifact tensor {key} in {f.name} does not belong to the model.")
                value = sf.get_tensor(key)
                shape, want = expected[key]
                if value.shape != shape:
                    raise UserError(f"Artifact tensor {key} in {f.name} has shape {list(value.shape)}; the model "
                                    f"expects {list(shape)}.")
                packed = _is_packed_field(key, model)
                if _dtype_misfit(value.dtype, want, packed):  # (it was cast: int64 norm weights ran, ppl ×5)
                    raise UserError(f"Artifact tensor {key} in {f.name} is {str(value.dtype)[6:]}; the model "
                                    f"expects {str(want)[6:]}{'' if packed else ' or another float type'}.")
                place_tensor(model, key, value, None if packed else dtype)
                loaded.add(key)
    check_complete(model, f"Artifact {path}")
    model.eval()
    for hook, stage in hooks:
        try:
            hook.ready(model, stage)
        except _STAGE_ERRORS as e:
            raise _stage_misfit(path, stage, e) from None
    if device_map is not None:
        model = dispatch(model, device_map, max_memory, offload_folder)
    elif device is not None:
        model.to(device)
    return model, load_tokenizer(path, strict_tokenizer), manifest
