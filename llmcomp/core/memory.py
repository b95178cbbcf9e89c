"""Memory controls for big models: ``--max-memory`` specs, a hard GPU cap, and accelerate placement.

Two meanings of a limit, on purpose:

- **quantize** (``gpu_cap``): the model stays in CPU memory and the calibration driver moves one decoder
  layer at a time to the GPU. A GPU entry of ``--max-memory`` becomes a hard cap on this process's
  CUDA allocator (``torch.cuda.set_per_process_memory_fraction``) for the job: the run either fits or
  stops with one line naming the layer that did not fit. The CUDA context itself (a few hundred MB)
  is outside the allocator and not counted.
- **load / eval** (``dispatch``): accelerate's meaning — the budget for *weights* on each device when
  ``device_map="auto"`` places decoder layers over GPU, CPU and disk; activations come on top.

On a machine without a visible GPU, GPU entries are satisfied trivially and ignored (the same command
runs anywhere); naming a GPU index that does not exist on a machine with GPUs is an error.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from llmcomp.core.numeric import storage_key
from llmcomp.errors import UserError

Key = Union[int, str]  # accelerate's keys: GPU index, or "cpu"

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
DEVICE_MAPS = ("auto", "cpu", "cuda")
_EXAMPLE = "e.g. cuda:0=2GiB,cpu=24GiB"


def parse_size(text: str) -> int:
    """``"2GiB"`` → 2147483648; units B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB (of 2); no unit = bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2).lower() or "b") if m else None
    if m is None or unit not in UNITS:
        raise UserError(f"--max-memory size {text.strip()!r} is not a size such as 2GiB, 1.5GB or 512MiB.")
    number = float(m.group(1)) * UNITS[unit]
    if not number < 2 ** 63:  # (400 digits: inf, an OverflowError traceback)
        raise UserError(f"--max-memory size {text.strip()[:40]!r} is larger than any machine's memory.")
    value = int(number)
    if value <= 0:
        raise UserError(f"--max-memory size {text.strip()!r} must be more than 0 bytes.")
    return value


def parse_device(text: str) -> Key:
    """``cuda:1`` / ``1`` → 1; ``cuda`` → 0; ``cpu`` → ``"cpu"``."""
    t = text.strip().lower()
    if t == "cpu":
        return "cpu"
    if t == "cuda":
        return 0
    m = re.fullmatch(r"(?:cuda:)?(\d+)", t)
    if m is None:
        raise UserError(f"--max-memory device {text.strip()!r} is not cuda:N, N or cpu ({_EXAMPLE}).")
    return int(m.group(1))


def parse_max_memory(spec: Union[str, dict, None]) -> Optional[dict[Key, int]]:
    """``"cuda:0=2GiB,cpu=24GiB"`` → ``{0: 2147483648, "cpu": 25769803776}`` (accelerate's max_memory).
    A dict is validated the same way (values may be sizes as strings or ints)."""
    if spec is None:
        return None
    items = spec.items() if isinstance(spec, dict) else None
    if items is None:
        if not str(spec).strip():
            raise UserError(f"--max-memory is empty; give DEVICE=SIZE pairs ({_EXAMPLE}).")
        items = []
        for part in str(spec).split(","):
            device, eq, size = part.partition("=")
            if not eq or not device.strip() or not size.strip():
                raise UserError(f"--max-memory entry {part.strip()!r} is not DEVICE=SIZE ({_EXAMPLE}).")
            items.append((device, size))
    out: dict[Key, int] = {}
    for device, size in items:
        key = device if isinstance(device, int) else parse_device(str(device))
        if key in out:
            raise UserError(f"--max-memory names {format_device(key)} twice.")
        out[key] = size if isinstance(size, int) and size > 0 else parse_size(str(size))
    return out


def format_device(key: Key) -> str:
    return key if isinstance(key, str) else f"cuda:{key}"


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def gpu_limits(max_memory: Optional[dict[Key, int]]) -> dict[int, int]:
    """The GPU entries of a parsed spec that apply on this machine (none without a visible GPU)."""
    gpus = {k: v for k, v in (max_memory or {}).items() if isinstance(k, int)}
    if not gpus or not torch.cuda.is_available():
        return {}
    count = torch.cuda.device_count()
    for k in gpus:
        if k >= count:
            raise UserError(f"--max-memory names cuda:{k}, but this machine has {count} GPU(s) "
                            f"(cuda:0..cuda:{count - 1}).")
    return gpus


# The cap in force (device index → bytes), for error messages raised deeper down.
_ACTIVE: dict[int, int] = {}


def active_cap(device=None) -> Optional[int]:
    """The GPU cap set by ``gpu_cap`` for ``device`` (a torch device or string), or None."""
    if not _ACTIVE or device is None:
        return None
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return _ACTIVE.get(d.index if d.index is not None else torch.cuda.current_device())


@contextlib.contextmanager
def gpu_cap(limits: dict[int, int]) -> Iterator[None]:
    """Cap this process's CUDA allocator on each GPU of ``limits`` (index → bytes) inside the block,
    restoring the previous fractions afterwards. ``limits`` from ``gpu_limits``; empty = no-op."""
    if not limits:
        yield
        return
    previous = {}
    try:
        for index, limit in limits.items():
            total = torch.cuda.get_device_properties(index).total_memory
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch ≥ 2.6
            previous[index] = getter(index) if getter is not None else 1.0
            torch.cuda.empty_cache()  # cached blocks would count against the cap
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
            _ACTIVE[index] = limit
        try:
            yield
        except torch.cuda.OutOfMemoryError:  # layers name themselves (calibration driver); this is the rest
            limit = " / ".join(f"cuda:{i}={format_bytes(v)}" for i, v in limits.items())
            raise UserError(f"The job does not fit in the GPU limit set by --max-memory ({limit}); raise the "
                            "limit or calibrate with --device cpu.") from None
    finally:
        for index, fraction in previous.items():
            _ACTIVE.pop(index, None)
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(fraction, index)


# What a CUDA out-of-memory error tells the user to do, in the command's own flags: quantize's (it alone has
# --calib-batch), and the other calibrating commands' (prune experts / dynamic / kv, convert moefy).
QUANTIZE_REMEDY = "lower --calib-batch, or calibrate with --device cpu"
CALIBRATION_REMEDY = "lower --calib-samples or --seq-len, or run with --device cpu"


def out_of_memory(what: str, device, remedy: str = CALIBRATION_REMEDY) -> UserError:
    """The one-line error for a CUDA out-of-memory while working on ``what`` (e.g. a decoder layer); ``remedy``
    names the command's own flags (not every command that calibrates has --calib-batch)."""
    cap = active_cap(device)
    if cap is not None:
        return UserError(f"{what} does not fit in the {format_bytes(cap)} GPU limit set by --max-memory; "
                         f"raise the limit, {remedy}.")
    d = torch.device(device)
    size = ""
    if d.type == "cuda" and torch.cuda.is_available():
        size = f" ({format_bytes(torch.cuda.get_device_properties(d.index or 0).total_memory)})"
    return UserError(f"{what} does not fit in the memory of {d}{size}; {remedy}.")


CGROUP = Path("/sys/fs/cgroup")


def available_cpu_bytes() -> Optional[int]:
    """CPU memory this process can still take without swapping: Linux's MemAvailable, or less where a cgroup (a
    container, a batch job) caps it — there the OOM killer acts at the cap. None where unknown."""
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit, used in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):  # (cgroup v2, v1)
        try:
            cap = (CGROUP / limit).read_text().strip()
            if cap != "max" and int(cap) < 2 ** 60:  # (v1 writes "no limit" as a huge number)
                free.append(max(0, int(cap) - int((CGROUP / used).read_text())))
        except (OSError, ValueError):
            pass
    return min(free) if free else None


def free_bytes(device) -> Optional[int]:
    """Memory this process can still take on ``device``: a GPU's free memory (plus what torch's allocator holds
    unused; under a ``gpu_cap``, what the cap leaves), else the CPU's (``available_cpu_bytes``); None where unknown."""
    d = torch.device(device)
    if d.type != "cuda":
        return available_cpu_bytes()
    if not torch.cuda.is_available():
        return None
    used = torch.cuda.memory_allocated(d)
    free = torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - used
    cap = active_cap(d)
    return free if cap is None else max(0, min(free, cap - used))


def check_fits(more: int, what: str, remedy: str, device="cpu") -> None:
    """Refuse work that would take ``more`` bytes of ``device``'s memory than it holds yet, above what is free: on the
    CPU the kernel's OOM killer otherwise ends the job without a word, on a GPU an out-of-memory error comes after
    the work before it. ``remedy``: the command's own flags."""
    free = free_bytes(device)
    if free is not None and more > free:
        where = "CPU" if torch.device(device).type == "cpu" else str(device)
        raise UserError(f"{what} would take {format_bytes(more)} more of {where} memory, more than the "
                        f"{format_bytes(free)} available; {remedy}.")


def state_bytes(state: dict) -> int:
    """Bytes of a state dict's tensors (a model's size in memory), a storage shared by several entries — tied
    embeddings — once (counted twice, it refused a --max-memory cpu=... the model fits in)."""
    seen, total = set(), 0
    for t in state.values():
        key = storage_key(t) or id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def check_cpu_fits(model: torch.nn.Module, max_memory: Optional[dict[Key, int]]) -> None:
    """Quantize keeps the whole model in CPU memory: a ``cpu`` entry smaller than the model is an error
    (a check, not an enforced limit)."""
    limit = (max_memory or {}).get("cpu")
    if limit is None:
        return
    need = state_bytes(model.state_dict())
    if need > limit:
        raise UserError(f"quantize keeps the whole model in CPU memory ({format_bytes(need)}), more than "
                        f"--max-memory cpu={format_bytes(limit)}; raise the cpu entry.")


def check_device(device: Optional[str]) -> Optional[str]:
    """``--device`` as given (None stays None) once torch knows it and it is here: cpu, or cuda[:N] with a GPU."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} needs a CUDA GPU; none is visible to torch here (use cpu).")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs here.")
    elif d.type != "cpu":
        raise UserError(f"--device {device!r}: llmcomp runs on cpu or cuda[:N].")
    return device


def resolve_placement(device: Optional[str], device_map, max_memory, offload_folder) -> tuple:
    """Validate load/eval placement flags: ``(device, device_map, max_memory dict, offload_folder)``.
    ``--max-memory`` or ``--offload-folder`` without a device map imply ``device_map="auto"``."""
    check_device(device)
    limits = parse_max_memory(max_memory)
    if isinstance(device_map, str):
        dm = device_map.strip().lower()
        if dm not in DEVICE_MAPS and not re.fullmatch(r"cuda:\d+", dm):
            raise UserError(f"--device-map {device_map!r} is not one of: {', '.join(DEVICE_MAPS)} (or cuda:N).")
        if dm.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device-map {device_map} needs a CUDA GPU; none is visible (use auto or cpu).")
        device_map = dm
    if device_map is not None and device is not None:
        raise UserError("--device and --device-map both place the model; pass one of them.")
    if offload_folder is not None and Path(offload_folder).exists() and not Path(offload_folder).is_dir():
        raise UserError(f"--offload-folder {offload_folder} is a file; give a directory (it is created if missing).")
    if limits and device_map not in (None, "auto"):
        where = device_map if isinstance(device_map, str) else "an explicit map"
        raise UserError(f"--max-memory applies to --device-map auto, not {where}.")
    if offload_folder and isinstance(device_map, str) and device_map != "auto":
        raise UserError(f"--offload-folder applies to --device-map auto (or an explicit map with disk entries), not "
                        f"{device_map}.")
    if (limits or offload_folder) and device_map is None:
        if device is not None:
            raise UserError("--device and --max-memory / --offload-folder both place the model (the latter imply "
                            "--device-map auto); pass one of them.")
        device_map = "auto"
    return device, device_map, limits, offload_folder


def budget(limits: Optional[dict[Key, int]]) -> Optional[dict[Key, int]]:
    """A full accelerate max_memory: the named devices' limits over accelerate's defaults for the rest;
    GPU entries dropped where no GPU is visible."""
    if not limits:
        return None
    from accelerate.utils import get_max_memory

    gpus = gpu_limits(limits)
    return {**get_max_memory(), **gpus, **{k: v for k, v in limits.items() if isinstance(k, str)}}


def over_budget(need: int, device_map=None, max_memory=None) -> UserError:
    """A placement that puts part of the model on disk without --offload-folder: asked for, since disk is slow."""
    if isinstance(device_map, dict):
        return UserError("The device map puts part of the model on disk; pass --offload-folder DIR to hold it.")
    where = "--max-memory on GPU and CPU" if max_memory else "this machine's free GPU and CPU memory"
    return UserError(f"The model ({format_bytes(need)}) does not fit in {where}; pass --offload-folder DIR to keep "
                     f"the rest on disk{', or raise the limits' if max_memory else ''}.")


def refuse_disk(model_bytes, device_map, max_memory=None) -> None:
    """Refuse, before a load without --offload-folder, a placement sure to put part of the model on disk: a map that
    names disk, or ``device_map="auto"`` with the model's ``model_bytes()`` (None: unknown) over all the memory it may
    fill. accelerate's plan keeps room spare, so a model within that may go to disk yet: the load's own check."""
    if isinstance(device_map, dict) and "disk" in device_map.values():
        raise over_budget(0, device_map)
    if device_map != "auto":
        return
    from accelerate.utils import get_max_memory

    room = sum(v for k, v in (budget(max_memory) or get_max_memory()).items() if k != "disk")
    need = model_bytes()
    if need is not None and need > room:
        raise over_budget(need, device_map, max_memory)


def dispatch(model: torch.nn.Module, device_map, max_memory=None, offload_folder=None) -> torch.nn.Module:
    """Place a model that is loaded on CPU: ``device_map`` ``"auto"`` (accelerate plans decoder layers
    over GPUs, CPU and disk under ``max_memory``), a device name, or an explicit ``{module: device}``.
    Quantized layers that accelerate offloads keep no dequantized-weight cache (it would pin a copy on
    the GPU), and with a ``max_memory`` no quantized layer keeps one, so the budget holds."""
    from accelerate import dispatch_model, infer_auto_device_map

    from llmcomp.core.qlinear import QuantLinear

    limits = parse_max_memory(max_memory)
    given_map = device_map
    if device_map == "auto":
        device_map = infer_auto_device_map(model, max_memory=budget(limits),
                                           no_split_module_classes=model._no_split_modules, offload_buffers=True)
    elif isinstance(device_map, str):
        device_map = {"": device_map}
    if device_map.get("") == "disk":  # accelerate extracts nothing for the root module: name its children
        device_map = {n: "disk" for n, _ in model.named_children()}
    main = next((d for d in device_map.values() if d not in ("cpu", "disk")), "cpu")
    state = model.state_dict()
    # A module with no saved tensors (rotary embeddings: non-persistent buffers only) gains nothing from
    # offload, and a disk part with nothing to write breaks accelerate's loader: run it where inputs start.
    device_map = {n: (main if d == "disk" and not any(_under(k, n) for k in state) else d)
                  for n, d in device_map.items()}
    if "disk" in device_map.values():
        if offload_folder is None:
            raise over_budget(state_bytes(state), given_map, limits)
        # a fresh folder per load: accelerate reuses any offloaded weights it finds in the folder it is given
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        offload_folder = tempfile.mkdtemp(prefix="llmcomp-offload-", dir=offload_folder)
    offloaded = [n for n, d in device_map.items() if d == "disk" or (d == "cpu" and main != "cpu")]
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and (limits or any(_under(name, o) for o in offloaded)):
            mod.cache_dequantized = False
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_folder, offload_buffers=True)
    if "disk" in device_map.values():
        weakref.finalize(model, shutil.rmtree, offload_folder, True)  # the offloaded copy lives as long as the model
    return model


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where to put input ids: the input embeddings' execution device (accelerate-placed models keep
    offloaded weights on ``meta``), else the first parameter's device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    p = next(model.parameters())
    return p.device if p.device.type != "meta" else torch.device("cpu")


def device_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many modules of an accelerate device map went to each device (``{}`` if not dispatched)."""
    out: dict[str, int] = {}
    for d in getattr(model, "hf_device_map", {}).values():
        key = format_device(d) if isinstance(d, int) else str(d)
        out[key] = out.get(key, 0) + 1
    return out
