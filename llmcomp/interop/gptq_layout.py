"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel, loaded by transformers through optimum + gptqmodel).

Per quantized linear of ``out × in`` with ``G`` groups along the input dimension:

- ``qweight`` int32 [in·bits/32, out] — codes as one little-endian bit stream down each *column*
  (the input dimension), 32/bits codes a word for 2/4/8 bits, 32 codes in 3 words for 3 bits
- ``qzeros``  int32 [G, out·bits/32] — zero points, the same stream along the output dimension;
  ``checkpoint_format`` "gptq" (v1) stores ``z - 1`` (so z = 0 cannot be stored), "gptq_v2" stores z
- ``scales``  float16 [G, out]
- ``g_idx``   int32 [in] — the group of each input column (i // group_size without act-order)
- ``bias``    optional

``w[o, i] = scales[g_idx[i], o] · (code[i, o] − z[g_idx[i], o])``. That is llmcomp's ``uniform`` format
transposed, so export and import are lossless; a ragged last group is just ``g_idx = i // group_size``.
``config.json`` carries ``quantization_config = {"quant_method": "gptq", "bits", "group_size" (-1 =
per-channel), "sym", "desc_act", "checkpoint_format", ...}`` — one setting for the whole model.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from llmcomp.core.model import decoder_layers
from llmcomp.errors import UserError
from llmcomp.formats.uniform import Uniform
from llmcomp.interop import checked_source
from llmcomp.interop.source import (check_integer_zeros, formats_of, Source, uniform_fields, unsupported_format,
                                    write_checkpoint)
from llmcomp.interop.words import codes_to_words, words_to_codes

GPTQ_BITS = (2, 3, 4, 8)
TARGET = "GPTQ"


# -- layout ---------------------------------------------------------------------------------------
def pack_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
               v1: bool) -> dict[str, torch.Tensor]:
    """codes uint8 [out, in], scale [out, G], integer zero [out, G] → qweight, qzeros, scales, g_idx."""
    out_f, in_f = codes.shape
    stored_zero = (zero - 1) & ((1 << bits) - 1) if v1 else zero
    g = group_size or in_f
    return {
        "qweight": codes_to_words(codes, bits, in_f * bits // 32).t().contiguous(),
        "qzeros": codes_to_words(stored_zero.t().to(torch.uint8), bits, out_f * bits // 32),
        "scales": scale.t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(in_f) // g).to(torch.int32),
    }


def unpack_layer(t: dict[str, torch.Tensor], bits: int, v1: bool) -> dict[str, torch.Tensor]:
    """Inverse of ``pack_layer``: codes uint8 [out, in], zero int64 [out, G] (v1: stored + 1), scale
    float16 [out, G], g_idx int64 [in] (None where the checkpoint has none: groups in order)."""
    in_f = t["qweight"].shape[0] * 32 // bits
    out_f = t["qweight"].shape[1]
    zero = words_to_codes(t["qzeros"], bits, out_f).t().long()
    return {"codes": words_to_codes(t["qweight"].t(), bits, in_f), "zero": zero + 1 if v1 else zero,
            "scale": t["scales"].t(), "g_idx": t["g_idx"].long() if "g_idx" in t else None}


def _stream_read(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Independent reader (no bitpack): value k of each column's stream, k < n. words int32 [W, cols]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:1])])  # a zero word after the last, for spills
    pos = torch.arange(n) * bits
    word, off = pos // 32, pos % 32
    lo = w[word] >> off[:, None]
    hi = w[word + 1] << (32 - off)[:, None]
    return (lo | hi) & ((1 << bits) - 1)  # [n, cols]


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int, v1: bool = True) -> torch.Tensor:
    """Reference GPTQ dequantize written from the layout alone, as GPTQ kernels read it: float32 [out, in]."""
    in_f = t["qweight"].shape[0] * 32 // bits
    out_f = t["qweight"].shape[1]
    q = _stream_read(t["qweight"], bits, in_f)  # [in, out]
    z = _stream_read(t["qzeros"].t(), bits, out_f).t()  # [G, out]
    if v1:
        z = z + 1
    g_idx = t["g_idx"].long() if "g_idx" in t else torch.zeros(in_f, dtype=torch.long)
    w = t["scales"].float()[g_idx] * (q - z[g_idx]).float()
    return w.t().contiguous()


# -- export -----------------------------------------------------------------------------------------
def _check_coverage(src: Source) -> None:
    """GPTQ loaders quantize every linear inside the decoder layers and nothing else."""
    from llmcomp.core.qlinear import QuantLinear

    prefix, _ = decoder_layers(src.model)
    quantized = {layer.path for layer in src.layers}
    for name, mod in src.model.named_modules():
        inside = name.startswith(prefix + ".")
        if inside and isinstance(mod, nn.Linear) and name not in quantized:
            raise UserError(f"{name} is not quantized, but a GPTQ checkpoint quantizes every linear layer of the "
                            f"decoder; quantize that layer too.")
        if not inside and isinstance(mod, QuantLinear):
            raise UserError(f"{name} is quantized outside the decoder layers, which the GPTQ layout does not "
                            f"cover; quantize with --ignore {name}.")


def check(src: Source) -> None:
    """The GPTQ layout's refusals of an artifact, before anything is written: one uniform int2/3/4/8 format, every
    decoder linear quantized and nothing outside, dimensions its int32 words pack."""
    groups = formats_of(src)
    for fmt, layers in groups.items():
        if not isinstance(fmt, Uniform):
            raise unsupported_format(layers[0], TARGET, "uniform int2/int3/int4/int8")
    if len(groups) > 1:
        raise UserError(f"{src.path} mixes {len(groups)} formats ({', '.join(f.describe() for f in groups)}); a GPTQ "
                        f"checkpoint has one bits/group setting for the model.")
    fmt = next(iter(groups))
    if fmt.bits not in GPTQ_BITS:
        raise UserError(f"GPTQ checkpoints store 2, 3, 4 or 8 bits; {src.path} is {fmt.describe()}.")
    _check_coverage(src)
    for layer in src.layers:
        for dim, name in ((layer.in_features, "input"), (layer.out_features, "output")):
            if dim % 8 or dim * fmt.bits % 32:
                raise UserError(f"{layer.path}: the GPTQ layout packs {fmt.bits}-bit codes into int32 words along "
                                f"both dimensions, so its {name} dimension ({dim}) must be a multiple of "
                                f"{max(8, 32 // math.gcd(32, fmt.bits))}.")
    check_integer_zeros(src, TARGET)


def export_gptq(artifact, output, *, overwrite: bool = False) -> dict:
    """Write ``artifact`` (uniform int2/3/4/8, one format for every layer) as a GPTQ checkpoint."""
    output, src = checked_source(artifact, output, overwrite, "gptq", TARGET)
    fmt = next(iter(formats_of(src)))
    tensors = src.other_tensors()
    fields = {layer.path: uniform_fields(layer, TARGET) for layer in src.layers}
    v1 = all(bool((f["zero"] > 0).all()) for f in fields.values())  # v1 cannot store z = 0
    for layer in src.layers:
        f = fields[layer.path]
        for k, t in pack_layer(f["codes"], f["scale"], f["zero"], fmt.bits, fmt.group_size, v1).items():
            tensors[f"{layer.path}.{k}"] = t
        if layer.bias is not None:
            tensors[f"{layer.path}.bias"] = layer.bias
    config = {"quant_method": "gptq", "bits": fmt.bits, "group_size": fmt.group_size or -1, "sym": fmt.symmetric,
              "desc_act": False, "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
              "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32",
              "meta": {"quantizer": [f"llmcomp:{_version()}"]}}
    path = write_checkpoint(src, Path(output), tensors, config, overwrite=overwrite)
    ragged = [layer.path for layer in src.layers if fmt.group_size and layer.in_features % fmt.group_size]
    return {"path": str(path), "format": "gptq", "checkpoint_format": config["checkpoint_format"],
            "layers": len(src.layers), "scheme": fmt.describe(), "ragged_layers": len(ragged)}


def _version() -> str:
    from llmcomp import __version__

    return __version__


# -- import -----------------------------------------------------------------------------------------
def import_layer(path: str, t: dict[str, torch.Tensor], qcfg: dict, in_features: int):
    """One GPTQ layer → (Uniform format, its packed tensors), exactly; UserError when not expressible."""
    if qcfg.get("dynamic"):  # (GPTQModel's per-module overrides: read with the global bits/group, they failed
        raise UserError(  # with a false reason, e.g. "act-order with a permuted g_idx")
            "This GPTQ checkpoint overrides bits or group size per module (quantization_config.dynamic), which "
            "llmcomp does not import.")
    if str(qcfg.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise UserError(f"This GPTQ checkpoint packs its codes in {qcfg['pack_dtype']} words "
                        "(quantization_config.pack_dtype); llmcomp imports int32 words.")
    bits, group = qcfg.get("bits", 4), qcfg.get("group_size", -1)
    for name, value in (("bits", bits), ("group_size", group)):  # (int() read 4.7 as 4, and None as a traceback)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"This GPTQ checkpoint's quantization_config.{name} is {value!r}, not an integer.")
    if bits not in GPTQ_BITS:
        raise UserError(f"GPTQ checkpoint with {bits} bits; llmcomp imports 2, 3, 4 or 8.")
    v1 = qcfg.get("checkpoint_format", "gptq") != "gptq_v2"
    group = 0 if group <= 0 or group >= in_features else group
    f = unpack_layer(t, bits, v1)
    if f["codes"].shape[1] != in_features:
        raise UserError(f"{path}.qweight holds {f['codes'].shape[1]} input columns, the model's layer has "
                        f"{in_features}.")
    if "g_idx" in t and not torch.equal(f["g_idx"], torch.arange(in_features) // (group or in_features)):
        g = f["g_idx"]
        if bool((g[1:] >= g[:-1]).all()):  # (in order, other groups: not act-order, and it said it was)
            raise UserError(f"{path}.g_idx groups the inputs otherwise than quantization_config.group_size "
                            f"{qcfg.get('group_size')} says; fix the group size in config.json.")
        raise UserError(f"{path} uses act-order with a permuted g_idx (desc_act), which llmcomp's uniform format "
                        f"does not store; import a checkpoint quantized without act-order or with static groups.")
    if group % 8:
        raise UserError(f"GPTQ group size {group} is not a multiple of 8, which llmcomp's uniform format needs.")
    scale = f["scale"].to(torch.float16)
    if not torch.equal(scale.float(), f["scale"].float()):
        raise UserError(f"{path}.scales are not exactly representable in float16.")
    zero = f["zero"]
    sym = bool((zero == 1 << (bits - 1)).all())
    fmt = Uniform(bits=bits, group_size=group, symmetric=sym)
    fields = {"codes": f["codes"], "scale": scale, "zero": zero.to(torch.float16)}
    return fmt, fmt.pack(fields)
