"""Bits per weight of the linear layers and on-disk size."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmcomp.core.qlinear import QuantLinear


def size_report(model: nn.Module, path: Path | None = None, ignore=("lm_head",),
                store_dtype: torch.dtype | None = None) -> dict:
    """``bits_per_weight``: storage bits per weight over the decoder's linear layers (quantized or
    not, lm_head excluded) in llmcomp's layout of each format — for an imported GPTQ / compressed-tensors
    checkpoint that is the bits it holds once loaded, not its own files' (their g_idx, int32 zeros and float32
    scales take more: ``size_mb`` counts those); ``size_mb``: the weight files a load reads (if ``path``;
    ``weights_mb``).
    An unquantized linear counts at the dtype it is stored in: ``store_dtype`` (an artifact about to be written
    so), else the one in ``path``'s weight files, else its own (a load upcasts to float32)."""
    stored = _stored_bits(Path(path)) if path is not None and store_dtype is None else {}
    bits, weights = 0.0, 0
    for name, mod in model.named_modules():
        if any(name == i or name.endswith("." + i) for i in ignore):
            continue
        if isinstance(mod, QuantLinear):
            n = mod.in_features * mod.out_features
            bits += mod.fmt.bits_per_weight(mod.out_features, mod.in_features) * n
            weights += n
        elif isinstance(mod, nn.Linear):
            n = mod.weight.numel()
            size = store_dtype.itemsize if store_dtype is not None else mod.weight.element_size()
            bits += stored.get(f"{name}.weight", 8 * size) * n
            weights += n
    out = {"bits_per_weight": bits / weights if weights else float("nan")}
    if path is not None:
        out["size_mb"] = weights_mb(Path(path))
    return out


_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8}


def _stored_bits(path: Path) -> dict[str, int]:
    """Bits an element of each floating tensor in ``path``'s weight files (their headers only)."""
    from safetensors import SafetensorError, safe_open

    from llmcomp.core.artifact import weight_files

    out = {}
    for f in weight_files(path):
        if not f.is_file():
            continue
        try:
            with safe_open(f, "pt") as sf:
                for key in sf.keys():
                    bits = _BITS.get(sf.get_slice(key).get_dtype())
                    if bits is not None:
                        out[key] = bits
        except (SafetensorError, OSError):  # (the load that gave the model has said what is wrong with them)
            continue
    return out


def weights_mb(path: Path) -> float:
    """MB of the weight files a load of ``path`` reads (its safetensors index's files, else model.safetensors) —
    not every ``*.safetensors`` beside them (a Mistral-style ``consolidated.safetensors``, hidden copies)."""
    from llmcomp.core.artifact import weight_files

    return sum(f.stat().st_size for f in weight_files(path) if f.is_file()) / 1e6
