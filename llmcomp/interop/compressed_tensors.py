"""compressed-tensors checkpoints (vLLM, llm-compressor): export and import.

Export maps each llmcomp format to a compressed-tensors scheme and packs with the package's own packing
functions (the optional extra ``llmcomp[export]``), writing exactly the tensors its compressor lists:

- ``uniform`` int2–int8, group or per-channel, sym/asym → ``pack-quantized``: ``weight_packed`` int32
  [out, ⌈in·b/32⌉], ``weight_scale`` [out, G], ``weight_shape`` int64 [2], asym also ``weight_zero_point``
  int32 [⌈out·b/32⌉, G] (packed along the output dimension)
- ``nvfp4`` (block 16) → ``nvfp4-pack-quantized``: ``weight_packed`` uint8 [out, in/2], ``weight_scale``
  float8_e4m3fn [out, in/16], ``weight_global_scale`` float32 [1] (the reciprocal of llmcomp's tensor scale)
- ``mxfp4`` (block 32) → ``mxfp4-pack-quantized``: ``weight_packed`` uint8 [out, in/2], ``weight_scale``
  uint8 E8M0 [out, in/32]

compressed-tensors stores integer codes signed (``q − 2^(b−1)``) and zero points likewise, so
``w = (q_s − zp_s) · s`` is llmcomp's ``(q − z) · s`` exactly. Scales are written in the artifact's float
dtype when that holds float16 values exactly (float32, float16), else in float16 (``scale_dtype`` says which).
compressed-tensors needs every group full: a layer whose input dimension is not a multiple of the group
size (llmcomp's ragged last group) is refused.

Import (``read_layer``) reads ``pack-quantized`` int layers back into ``uniform`` with plain torch (the
package is not needed).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from llmcomp.errors import UserError
from llmcomp.formats.fp4 import MXFP4, NVFP4
from llmcomp.formats.uniform import Uniform
from llmcomp.interop import checked_source
from llmcomp.interop.source import (check_integer_zeros, formats_of, Layer, Source, uniform_fields, unsupported_format,
                                    write_checkpoint)
from llmcomp.interop.words import words_to_codes

TARGET = "compressed-tensors"
SUPPORTED = "uniform int2-int8 with full groups, nvfp4 and mxfp4"


def require_package():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise UserError("Export to compressed-tensors needs the compressed-tensors package (llmcomp's optional "
                        "extra 'export'); install it with: pip install compressed-tensors") from None


# -- schemes ----------------------------------------------------------------------------------------
def _scheme(fmt, targets: list[str], scale_dtype: torch.dtype):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if isinstance(fmt, Uniform):
        args = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=fmt.symmetric,
                                strategy="group" if fmt.group_size else "channel", group_size=fmt.group_size or None,
                                dynamic=False, scale_dtype=scale_dtype)
        return QuantizationScheme(targets=targets, weights=args, format="pack-quantized")
    preset = {"nvfp4": ("NVFP4A16", "nvfp4-pack-quantized"), "mxfp4": ("MXFP4A16", "mxfp4-pack-quantized")}[fmt.name]
    scheme = preset_name_to_scheme(preset[0], targets)
    scheme.format = preset[1]
    return scheme


def check(src: Source) -> None:
    """compressed-tensors' refusals of an artifact's layers, before anything is written."""
    for layer in src.layers:
        _check_layer(layer)
    check_integer_zeros(src, TARGET)


def _check_layer(layer: Layer) -> None:
    fmt = layer.fmt
    if isinstance(fmt, Uniform):
        if fmt.group_size and layer.in_features % fmt.group_size:
            raise UserError(f"{layer.path}: compressed-tensors needs the input dimension ({layer.in_features}) to be a "
                            f"multiple of the group size ({fmt.group_size}); llmcomp's ragged last group has no "
                            f"equivalent there. Re-quantize with a group size that divides every layer.")
        return
    if isinstance(fmt, (NVFP4, MXFP4)):
        if fmt.block_size != fmt.SPEC_BLOCK:
            raise UserError(f"{layer.path} is {fmt.describe()}; compressed-tensors stores only the spec block size "
                            f"{fmt.SPEC_BLOCK}.")
        return
    raise unsupported_format(layer, TARGET, SUPPORTED)


def _pack(layer: Layer, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's compressed-tensors tensors (local names), packed by compressed-tensors' helpers."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    fmt, t = layer.fmt, layer.tensors
    if isinstance(fmt, Uniform):
        f = uniform_fields(layer, TARGET)
        mid = 1 << (fmt.bits - 1)
        out = {"weight_packed": pack_to_int32((f["codes"].long() - mid).to(torch.int8), fmt.bits),
               "weight_scale": f["scale"].to(scale_dtype),
               "weight_shape": torch.tensor([layer.out_features, layer.in_features])}
        if not fmt.symmetric:
            out["weight_zero_point"] = pack_to_int32((f["zero"] - mid).to(torch.int8), fmt.bits, packed_dim=0)
        return out
    values = fmt.element.decode(fmt.unpack(t, layer.in_features)["codes"])  # exact E2M1 values
    out = {"weight_packed": pack_fp4_to_uint8(values), "weight_scale": t["weight_scale"]}
    if isinstance(fmt, NVFP4):
        out["weight_global_scale"] = (1.0 / t["weight_global_scale"].float()).reshape(1)
    return out


def _scale_dtype(src: Source) -> torch.dtype:
    dtype = src.float_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.float64) else torch.float16


def export_compressed_tensors(artifact, output, *, overwrite: bool = False) -> dict:
    """Write ``artifact`` as a compressed-tensors checkpoint (one config group per llmcomp format)."""
    require_package()
    import compressed_tensors
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    output, src = checked_source(artifact, output, overwrite, "compressed-tensors", TARGET)
    scale_dtype = _scale_dtype(src)
    groups = formats_of(src)
    single = len(groups) == 1
    unquantized = [n for n, m in src.model.named_modules() if isinstance(m, nn.Linear)]
    tensors = src.other_tensors()
    config_groups = {}
    for i, (fmt, layers) in enumerate(groups.items()):
        scheme = _scheme(fmt, ["Linear"] if single else [layer.path for layer in layers], scale_dtype)
        config_groups[f"group_{i}"] = scheme
        expected = set(BaseCompressor.get_value_from_registry(scheme.format).compression_param_names(scheme))
        for layer in layers:
            packed = _pack(layer, scale_dtype)
            assert set(packed) == expected, (set(packed), expected)  # the compressor's own tensor list
            tensors.update({f"{layer.path}.{k}": v for k, v in packed.items()})
            if layer.bias is not None:
                tensors[f"{layer.path}.bias"] = layer.bias
    formats = {s.format for s in config_groups.values()}
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=unquantized, quantization_status="compressed",
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision")
    config = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
              **qconfig.model_dump(mode="json", exclude=["quant_method"])}
    path = write_checkpoint(src, Path(output), tensors, config, overwrite=overwrite)
    return {"path": str(path), "format": config["format"], "layers": len(src.layers),
            "scheme": ", ".join(f.describe() for f in groups), "unquantized_linears": len(unquantized)}


# -- import -----------------------------------------------------------------------------------------
def _matches(target: str, name: str, module: nn.Module) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type(module).__name__


def scheme_for(qcfg: dict, name: str, module: nn.Module):
    """The weights args dict of the config group that quantizes ``name``, or None."""
    if any(_matches(t, name, module) for t in qcfg.get("ignore") or []):
        return None
    for group in (qcfg.get("config_groups") or {}).values():
        if any(_matches(t, name, module) for t in group.get("targets", [])):
            return group
    return None


def read_layer(path: str, t: dict[str, torch.Tensor], group: dict, fmt_name: str, in_features: int):
    """One ``pack-quantized`` int layer → (Uniform format, its packed tensors), exactly."""
    w = group.get("weights") or {}
    if fmt_name != "pack-quantized" or w.get("type", "int") != "int":
        raise UserError(f"{path} is stored as compressed-tensors {fmt_name!r} ({w.get('type')}); llmcomp imports "
                        f"int pack-quantized layers only.")
    if group.get("input_activations"):
        raise UserError(f"{path} also quantizes activations, which llmcomp's uniform format does not; "
                        f"import a weight-only checkpoint.")
    bits, strategy = int(w.get("num_bits", 8)), w.get("strategy")
    if not 2 <= bits <= 8 or strategy not in ("group", "channel"):
        raise UserError(f"{path}: compressed-tensors {bits}-bit {strategy!r} weights; llmcomp imports 2-8 bit "
                        f"group or channel quantization.")
    out_f, words = t["weight_packed"].shape
    if words != -(-in_features * bits // 32):  # (compressed-tensors < 0.18 packed 32 // bits codes a word, padded:
        raise UserError(  # read as a dense stream, 3/5/6/7-bit layers came out wrong, silently)
            f"{path}.weight_packed has {words} int32 words a row; {in_features} dense-packed {bits}-bit codes take "
            f"{-(-in_features * bits // 32)} (a checkpoint of compressed-tensors before 0.18, one word per "
            f"{32 // bits} codes, is not imported).")
    mid = 1 << (bits - 1)
    codes = words_to_codes(t["weight_packed"], bits, in_features)
    scale = t["weight_scale"]
    if "weight_zero_point" in t and t["weight_zero_point"].dtype == torch.int32:  # packed along the output dim
        zero = words_to_codes(t["weight_zero_point"].t(), bits, out_f).t().float()
    elif "weight_zero_point" in t:  # older checkpoints: signed int8 [out, G]
        zero = t["weight_zero_point"].float() + mid
    else:
        zero = torch.full(scale.shape, float(mid))
    group_size = int(w.get("group_size") or 0) if strategy == "group" else 0
    static = torch.arange(in_features) // (group_size or in_features)
    if "weight_g_idx" in t and not torch.equal(t["weight_g_idx"].long(), static):
        raise UserError(f"{path} uses act-order with a permuted weight_g_idx, which llmcomp's uniform format does "
                        f"not store; import a checkpoint quantized without act-order or with static groups.")
    if group_size % 8:
        raise UserError(f"{path}: group size {group_size} is not a multiple of 8, which llmcomp's uniform "
                        f"format needs.")
    half = scale.to(torch.float16)
    if not torch.equal(half.float(), scale.float()):
        raise UserError(f"{path}.weight_scale is not exactly representable in float16 (llmcomp's scale dtype).")
    fmt = Uniform(bits=bits, group_size=group_size, symmetric="weight_zero_point" not in t)
    return fmt, fmt.pack({"codes": codes, "scale": half, "zero": zero.to(torch.float16)})
