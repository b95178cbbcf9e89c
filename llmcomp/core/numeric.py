"""Small tensor checks shared by the quantizers and the artifact writer."""
from __future__ import annotations

import torch


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
