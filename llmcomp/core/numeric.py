"""Small tensor helpers shared by the quantizers, the artifact writer and the memory accounting."""
from __future__ import annotations

from typing import Optional

import torch


def storage_key(t: torch.Tensor) -> Optional[tuple]:
    """What tensors sharing one piece of storage (tied embeddings) have in common; None for a meta or empty
    tensor, which has no storage of its own (every empty one sits at address 0)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` without its full-size temporaries (|t| and three masks; ~25× faster on a CPU):
    NaN propagates to both ends of ``aminmax`` and ±inf shows at one. One-byte floats (NVFP4's E4M3 block
    scales), which neither op takes on a CPU, are widened first."""
    if t.numel() == 0:
        return True
    if t.element_size() == 1:
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
