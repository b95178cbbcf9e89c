"""Open a GPTQ or compressed-tensors (``pack-quantized``) checkpoint as a model whose quantized linears are
llmcomp ``uniform`` ``QuantLinear`` layers, converted exactly, so ``llmcomp eval`` / ``quantize`` /
``llmcomp.load`` take it like an artifact. Plain torch: neither gptqmodel nor compressed-tensors is needed.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llmcomp.errors import UserError

# quant_method in config.json → (the tensor that marks a quantized linear, the importer's name)
KINDS = {"gptq": ".qweight", "compressed-tensors": ".weight_packed"}
LEGACY_GPTQ_CONFIG = "quantize_config.json"
# buffers some exporters saved that current transformers models recompute (not in their state dict)
RECOMPUTED = (".rotary_emb.inv_freq",)
# what ``llmcomp export`` writes beside a checkpoint: the exported artifact's base model, which an import records
BASE_RECORD = "llmcomp_base.json"


def detect(path: Path) -> Optional[str]:
    """``"gptq"`` or ``"compressed-tensors"`` when ``path/config.json`` says the checkpoint is one, else None."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    if qc is None and (Path(path) / LEGACY_GPTQ_CONFIG).exists():
        return "gptq"  # older AutoGPTQ checkpoints keep their settings beside config.json
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return method if method in KINDS else None


def quantization_config(path: Path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    if isinstance(cfg.get("quantization_config"), dict):
        return cfg["quantization_config"]
    try:
        return json.loads((Path(path) / LEGACY_GPTQ_CONFIG).read_text())
    except ValueError:
        raise UserError(f"{Path(path) / LEGACY_GPTQ_CONFIG} is not valid JSON.") from None


def _read_tensors(path: Path, qc: Optional[dict] = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmcomp.core.artifact import weight_files

    files = weight_files(path)
    base = (qc or {}).get("model_file_base_name")  # (older AutoGPTQ: gptq_model-4bit-128g.safetensors)
    if isinstance(base, str) and not files[0].exists() and (Path(path) / f"{base}.safetensors").is_file():
        files = [Path(path) / f"{base}.safetensors"]
    out = {}
    for f in files:
        if not f.exists():
            raise UserError(f"Checkpoint file {f} is missing.")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"Checkpoint file {f} could not be read: {str(exc).splitlines()[0]}") from None
    return out


def _convert(kind: str, name: str, fields: dict, qc: dict, module: nn.Module):
    if kind == "gptq":
        from llmcomp.interop.gptq_layout import import_layer

        return import_layer(name, fields, qc, module.in_features)
    from llmcomp.interop.compressed_tensors import read_layer, scheme_for

    group = scheme_for(qc, name, module)
    if group is None:
        raise UserError(f"{name} has packed weights but no config group of the quantization_config targets it.")
    return read_layer(name, fields, group, group.get("format") or qc.get("format"), module.in_features)


def open_checkpoint(path, kind: str, dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
                    strict_tokenizer: bool = True, describe_base: bool = True):
    """(model, tokenizer, base-model info, [import stage]) for a ``kind`` checkpoint directory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmcomp.core import model as model_mod
    from llmcomp.core.config import to_dict
    from llmcomp.core.qlinear import QuantLinear

    start = time.perf_counter()
    path = Path(path)
    qc = quantization_config(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is llmcomp's now; a saved artifact must not re-quantize
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model_mod.read_generation_config(model, path)
    tensors = _read_tensors(path, qc)
    marker = KINDS[kind]
    names = sorted(k[: -len(marker)] for k in tensors if k.endswith(marker))
    if not names:
        raise UserError(f"{path} says it is a {kind} checkpoint, but has no {marker[1:]} tensors.")
    formats = {}
    for name in names:
        fields = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors)
                  if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear):
            raise UserError(f"Checkpoint tensor {name}{marker} does not belong to a linear layer of the model.")
        try:
            fmt, packed = _convert(kind, name, fields, qc, old)
        except KeyError as exc:  # (a malformed config or a missing tensor: tracebacks from inside the layout code)
            raise UserError(f"Checkpoint layer {name} lacks {exc.args[0]!r} (its {kind} tensors or config).") from None
        except (ValueError, TypeError, AttributeError, re.error) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"Checkpoint layer {name} does not read as {kind}: {first}.") from None
        for field, spec in fmt.param_specs(old.out_features, old.in_features).items():
            got = packed.get(field)
            if got is not None and tuple(got.shape) != tuple(spec.shape):
                raise UserError(f"Checkpoint layer {name} does not fit the model's {old.out_features} x "
                                f"{old.in_features} linear: its {fmt.describe()} {field} comes out "
                                f"{list(got.shape)}, not {list(spec.shape)}.")
        bias = fields.get("bias")
        ql = QuantLinear.from_packed(fmt, packed, old.in_features, out_features=old.out_features,
                                     bias=None if bias is None else bias.to(dtype or torch.float32))
        model_mod.set_submodule(model, name, ql)
        formats[name] = fmt
    expected = model.state_dict()
    for key, value in tensors.items():
        if key not in expected and key.endswith(RECOMPUTED):
            continue
        if key not in expected:
            raise UserError(f"Checkpoint tensor {key} does not belong to the model.")
        if value.shape != expected[key].shape:
            raise UserError(f"Checkpoint tensor {key} has shape {list(value.shape)}; the model expects "
                            f"{list(expected[key].shape)}.")
        model_mod.place_tensor(model, key, value, dtype or torch.float32)
    model_mod.check_complete(model, f"Checkpoint {path}")
    model.eval()
    if device is not None:
        model.to(device)
    from llmcomp.eval.size import size_report

    distinct = list(dict.fromkeys(formats.values()))
    stage = {"method": f"import-{kind}",
             "config": {"format": to_dict(distinct[0]) if len(distinct) == 1 else None, "quantization_config": qc},
             "wall_time_s": round(time.perf_counter() - start, 2),
             "metrics": {"bits_per_weight": round(size_report(model)["bits_per_weight"], 4),
                         "imported_layers": len(formats),
                         # (its label read as if the head were float: api.stage_label names it from this)
                         "quantized_lm_head": isinstance(model.get_output_embeddings(), QuantLinear)}}
    base = None if not describe_base else exported_base(path) or {
        "name": model_mod.model_name(path), "path": str(path.resolve()), "sha256": model_mod.weights_sha256(path)}
    return model, model_mod.load_tokenizer(path, strict_tokenizer), base, [stage]


def exported_base(path: Path) -> Optional[dict]:
    """The base model of the artifact ``llmcomp export`` wrote ``path`` from: the original, which ``eval --reference
    base``, ``bench decode`` and the report compare with (the checkpoint itself, quantized already, was recorded);
    None for another tool's checkpoint, or a record not of that shape. An export travels, so its record's ``path`` is
    kept only where it holds the weights recorded here (``model.checked_base``: it hashes them once, as importing
    another tool's checkpoint hashes that); else name and sha256 stand alone, and the commands that need the base
    ask for one."""
    from llmcomp.core import model as model_mod

    try:
        base = json.loads((Path(path) / BASE_RECORD).read_text()).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    if not (isinstance(base, dict) and isinstance(base.get("name"), str) and isinstance(base.get("sha256"), str)
            and isinstance(base.get("path") or "", str)):  # (a null path: none recorded, as an absent one)
        return None
    out = {"name": base["name"], "sha256": base["sha256"]}
    try:
        here = model_mod.checked_base(path, base, "", missing_ok=True)
    except UserError:  # (a different model at that path)
        here = None
    return out if here is None else {**out, "path": here}
