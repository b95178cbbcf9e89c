"""One dequant-GEMM entry point for every weight format.

``dequant_linear(x, fmt, tensors, in_features, bias)`` computes ``x @ W.T + bias`` where ``W`` is stored
in ``fmt``. A fast path registered for ``(fmt.name, device type)`` runs when its ``supports`` check
passes; otherwise the pure-torch reference (``fmt.dequantize`` then ``F.linear``) runs — on CPU that is
always the case.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llmcomp.formats.base import WeightFormat

# (format name, device type) → list of (supports(fmt, x) -> bool,
#                                      fn(x, fmt, tensors, in_features, bias, cache))
# ``cache`` is a dict owned by the calling module where a fast path keeps its prepared layout.
_FAST: dict[tuple[str, str], list[tuple[Callable, Callable]]] = {}


def register_fast_path(format_name: str, device_type: str, supports: Callable, fn: Callable) -> None:
    _FAST.setdefault((format_name, device_type), []).append((supports, fn))


def reference_linear(
    x: torch.Tensor,
    fmt: WeightFormat,
    tensors: dict[str, torch.Tensor],
    in_features: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    w = fmt.dequantize(tensors, in_features, dtype=x.dtype)
    return F.linear(x, w, bias)


def fast_path(fmt: WeightFormat, x: torch.Tensor) -> Optional[Callable]:
    """The registered fast path that accepts ``(fmt, x)``, or None."""
    for supports, fn in _FAST.get((fmt.name, x.device.type), ()):
        if supports(fmt, x):
            return fn
    return None


def dequant_linear(
    x: torch.Tensor,
    fmt: WeightFormat,
    tensors: dict[str, torch.Tensor],
    in_features: int,
    bias: Optional[torch.Tensor] = None,
    cache: Optional[dict] = None,
) -> torch.Tensor:
    """``x @ W.T + bias``. ``cache``: a dict owned by the caller in which the reference path may keep
    the dequantized weight per (dtype, device) — decode on CPU would otherwise dequantize every
    weight at every generated token."""
    fn = fast_path(fmt, x)
    if fn is not None:
        return fn(x, fmt, tensors, in_features, bias, cache)
    if cache is None:
        return reference_linear(x, fmt, tensors, in_features, bias)
    # keyed on the packed tensors' identity and version counters, so replacing or editing them in
    # place invalidates the cached weight
    key = (x.dtype, x.device, *((t.data_ptr(), t._version) for t in tensors.values()))
    w = cache.get(key)
    if w is None:
        cache.clear()
        w = cache[key] = fmt.dequantize(tensors, in_features, dtype=x.dtype)
    return F.linear(x, w, bias)


def _register_builtin() -> None:
    """Fast paths whose dependencies are importable (Triton on CUDA machines); CPU needs none."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return

    def supports(fmt, x):
        from llmcomp.kernels import uniform_triton

        return uniform_triton.supports(fmt, x)

    def fn(x, fmt, tensors, in_features, bias=None, cache=None):
        from llmcomp.kernels import uniform_triton

        return uniform_triton.linear(x, fmt, tensors, in_features, bias, cache)

    register_fast_path("uniform", "cuda", supports, fn)


_register_builtin()
