"""What every exporter needs: an artifact opened for export, and an atomic checkpoint writer.

An exporter sees each quantized linear as a ``Layer`` (path, format, packed tensors, shape, bias) plus
the model's other tensors, and writes a plain Hugging Face directory: ``model.safetensors`` (sharded
past 4 GiB), ``config.json`` with a ``quantization_config``, and the artifact's generation config and
tokenizer files.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llmcomp.core.artifact import DEFAULT_SHARD_BYTES, INDEX, MANIFEST, _save_shards, _unique_state, is_artifact
from llmcomp.core.paths import atomic_dir, check_output
from llmcomp.core.qlinear import QuantLinear, untie_quantized_head
from llmcomp.errors import UserError
from llmcomp.formats.uniform import Uniform
from llmcomp.interop.imports import BASE_RECORD

# Manifest stage kinds that change the model's structure or runtime behaviour in ways only llmcomp.load
# rebuilds (prune/kv, prune/moe, linearize): other tools would load a different model.
_STAGE_KINDS = {"kv": "a KV-cache policy", "moe": "pruned MoE experts", "linearize": "linear-attention layers"}


def _stage_what(stage: dict) -> str:
    """What a stage with a kind leaves that other tools would not rebuild; an MoE stage by what it did (the kind
    alone named a dynamic skip stage "unfused or pruned experts" where a later quantize had unfused them)."""
    if stage["kind"] == "moe" and stage.get("method") == "unfuse-experts":
        return "unfused MoE experts"
    if stage["kind"] == "moe" and stage.get("skip_threshold") is not None:
        return "a dynamic expert-skip threshold"
    if stage["kind"] == "moe" and stage.get("method") == "experts-heapr":
        return "pruned MoE expert neurons"
    return _STAGE_KINDS.get(stage["kind"], f"a {stage['kind']!r} stage")


@dataclass
class Layer:
    path: str
    fmt: object  # a formats.WeightFormat
    tensors: dict[str, torch.Tensor]  # the format's packed tensors (weight_packed, weight_scale, ...)
    out_features: int
    in_features: int
    bias: Optional[torch.Tensor]


@dataclass
class Source:
    path: Path
    model: torch.nn.Module
    manifest: dict
    layers: list[Layer]

    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a quantized layer's weight (embeddings, norms, unquantized linears),
        each storage once (tied weights stay tied through the config), in its stored dtype."""
        quantized = {layer.path for layer in self.layers}
        state = _unique_state(self.model, None)
        return {k: v for k, v in state.items() if k.rpartition(".")[0] not in quantized}

    def float_dtype(self) -> torch.dtype:
        """The dtype the artifact stores its unquantized float tensors in (float32 when there are none)."""
        for t in self.other_tensors().values():
            if t.is_floating_point():
                return t.dtype
        return torch.float32


def _quant_method(path: Path) -> Optional[str]:
    """``config.json``'s ``quantization_config.quant_method`` (a checkpoint quantized by another tool), else None."""
    try:
        method = json.loads((path / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    except (OSError, ValueError, AttributeError):
        return None
    return method if isinstance(method, str) else None


def open_source(path, target: str) -> Source:
    """Open an llmcomp artifact for export to ``target`` (a name for messages); refuse what no other tool
    could load."""
    from llmcomp.core.artifact import load_artifact, read_manifest, stored_dtype
    from llmcomp.core.model import resolve

    p = resolve(path)
    if not is_artifact(p):
        method = _quant_method(p)  # (an imported GPTQ checkpoint was told to be quantized first)
        raise UserError(f"{p} is not an llmcomp artifact ({MANIFEST} is missing); export writes an artifact's "
                        + (f"quantized weights, and this is a {method} checkpoint already: other tools load it as "
                           "it is." if method else "quantized weights, so quantize the model first."))
    found: dict[str, str] = {}  # what → the first stage that left it
    for stage in read_manifest(p, verify=False)["stages"]:
        if stage.get("kind") is not None:
            found.setdefault(_stage_what(stage), stage.get("method"))
    if found:
        what = " and ".join(f"{w} (stage {m!r})" for w, m in found.items())
        one = len(found) == 1
        raise UserError(f"{p} has {what}, which {'has' if one else 'have'} no {target} equivalent; "
                        f"export an artifact without {'it' if one else 'them'}.")
    # (its files are copied as they are, config.json's dtype too: the unquantized tensors go out in that dtype)
    model, _, manifest = load_artifact(p, dtype=stored_dtype(p), strict_tokenizer=False)
    layers = [Layer(n, m.fmt, {k: t.detach().cpu() for k, t in m.packed_tensors().items()}, m.out_features,
                    m.in_features, None if m.bias is None else m.bias.detach().cpu())
              for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise UserError(f"{p} has no quantized layers; there is nothing to export as {target}.")
    return Source(p, model, manifest, layers)


def write_checkpoint(src: Source, dest: Path, tensors: dict[str, torch.Tensor], quantization_config: dict,
                     overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``tensors`` and the artifact's config (plus ``quantization_config``), generation config and
    tokenizer files as a Hugging Face checkpoint directory at ``dest`` (atomically), with its base model
    (``BASE_RECORD``) for an import to record."""
    dest = check_output(dest, overwrite, src.path)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        _save_shards({k: v.contiguous() for k, v in tensors.items()}, tmp, shard_bytes)
        for f in sorted(src.path.iterdir()):
            skip = (f.name in (MANIFEST, INDEX, "config.json") or f.name.endswith(".safetensors")
                    or f.name.startswith("."))  # (hidden: the output mark, a killed manifest update's temp)
            if f.is_file() and not skip:
                shutil.copyfile(f, tmp / f.name)
        config = json.loads((src.path / "config.json").read_text())
        config["quantization_config"] = quantization_config
        untie_quantized_head(src.model, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / BASE_RECORD).write_text(json.dumps({"base_model": src.manifest["base_model"]}, indent=1) + "\n")
    return dest


def formats_of(src: Source) -> dict:
    """{format spec: [layer, ...]} in model order."""
    groups: dict = {}
    for layer in src.layers:
        groups.setdefault(layer.fmt, []).append(layer)
    return groups


def unsupported_format(layer: Layer, target: str, supported: str) -> UserError:
    return UserError(f"{layer.path} is stored as {layer.fmt.describe()} ({layer.fmt.name}), which has no {target} "
                     f"equivalent ({target} export takes {supported}).")


def check_integer_zeros(src: Source, target: str) -> None:
    """``integer_zeros``' refusal for a target's ``check``, from the zeros alone (it came only while the tensors were
    converted, after the other target had been suggested)."""
    for layer in src.layers:
        if isinstance(layer.fmt, Uniform):
            integer_zeros(layer, target)


def integer_zeros(layer: Layer, target: str) -> torch.Tensor:
    """A ``uniform`` layer's zero points as integers (int64 [out, G]); refuses real-valued zeros (decoupleQ), which
    integer checkpoints cannot store."""
    zero = layer.fmt.zero_points(layer.tensors).float()
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > layer.fmt.maxq:
        raise UserError(f"{layer.path} has real-valued zero points (decoupleQ float zeros), which have no {target} "
                        f"equivalent: {target} stores integer zero points in [0, {layer.fmt.maxq}].")
    return zero.long()


def uniform_fields(layer: Layer, target: str) -> dict[str, torch.Tensor]:
    """A ``uniform`` layer's codes (uint8 [out, in]), scale (float16 [out, G]) and integer zero point
    (int64 [out, G], ``integer_zeros``)."""
    f = layer.fmt.unpack(layer.tensors, layer.in_features)
    return {"codes": f["codes"], "scale": f["scale"].to(torch.float16), "zero": integer_zeros(layer, target)}
