"""Bits per weight of the linear layers and on-disk size."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from llmcomp.core.qlinear import QuantLinear


def size_report(model: nn.Module, path: Path | None = None, ignore=("lm_head",)) -> dict:
    """``bits_per_weight``: storage bits per weight over the decoder's linear layers (quantized or
    not, lm_head excluded); ``size_mb``: the weight files a load reads (if ``path``; ``weights_mb``)."""
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
            bits += 8 * mod.weight.element_size() * n
            weights += n
    out = {"bits_per_weight": bits / weights if weights else float("nan")}
    if path is not None:
        out["size_mb"] = weights_mb(Path(path))
    return out


def weights_mb(path: Path) -> float:
    """MB of the weight files a load of ``path`` reads (its safetensors index's files, else model.safetensors) —
    not every ``*.safetensors`` beside them (a Mistral-style ``consolidated.safetensors``, hidden copies)."""
    from llmcomp.core.artifact import weight_files

    return sum(f.stat().st_size for f in weight_files(path) if f.is_file()) / 1e6
