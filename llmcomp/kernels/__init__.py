"""One dequant-GEMM entry point for every weight format.

``dequant_linear(x, fmt, tensors, in_features, bias)`` computes ``x @ W.T + bias`` where ``W`` is stored
in ``fmt``. A fast path registered for ``(fmt.name, device type)`` runs when its ``supports`` check
passes; otherwise the pure-torch reference (``fmt.dequantize`` then ``F.linear``) runs — on CPU that is
always the case.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llmcomp.formats.base import WeightFormat

# (format name, device type) → list of (supports(fmt, x, tensors, in_features) -> bool,
#                                      fn(x, fmt, tensors, in_features, bias, cache),
#                                      freeze(fmt, tensors, in_features, dtype, cache) or None,
#                                      fuse(items, dtype) or None), tried in order
# ``cache`` is a dict owned by the calling module where a fast path keeps its prepared layout. ``freeze`` returns
# ``x2 [M, in_features] -> y [M, N]`` (no bias) that torch.compile traces without a graph break, or None. ``fuse``
# does the same for several weights of one input at once (``items``: (fmt, tensors, in_features, cache) each; the
# output columns are theirs in order), or returns None.
_FAST: dict[tuple[str, str], list[tuple[Callable, Callable, Optional[Callable], Optional[Callable]]]] = {}


def register_fast_path(format_name: str, device_type: str, supports: Callable, fn: Callable,
                       freeze: Optional[Callable] = None, fuse: Optional[Callable] = None) -> None:
    _FAST.setdefault((format_name, device_type), []).append((supports, fn, freeze, fuse))


def cached(cache: Optional[dict], tag: tuple, tensors: dict, build: Callable):
    """``build()``'s result for these packed tensors, kept in ``cache`` (a dict owned by the calling
    module). Keyed on ``tag`` and the tensors' identity and version counters, so replacing or editing
    them in place rebuilds it; one entry per cache. Without a cache, ``build()`` every call."""
    if cache is None:
        return build()
    # (inference-mode tensors have no version counter: an in-place edit inside inference mode goes unseen, so
    # QuantLinear drops its cache whenever a state dict is loaded into it, and clear_cache() is there for the rest)
    key = (*tag, *((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors.values()))
    value = cache.get(key)
    if value is None:
        cache.clear()
        value = cache[key] = build()
    return value


def rows_linear(x: torch.Tensor, in_features: int, gemm: Callable, bias=None) -> torch.Tensor:
    """``gemm`` on x's rows [M, in_features] → y [M, N] (in x's dtype), plus ``bias``, in x's leading shape."""
    y = gemm(x.reshape(-1, in_features))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def reference_linear(
    x: torch.Tensor,
    fmt: WeightFormat,
    tensors: dict[str, torch.Tensor],
    in_features: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    w = fmt.dequantize(tensors, in_features, dtype=x.dtype)
    return F.linear(x, w, bias)


def fast_path(fmt: WeightFormat, x: torch.Tensor, tensors: dict, in_features: int) -> Optional[Callable]:
    """The first registered fast path that accepts this weight and input, or None."""
    found = _first(fmt, x, tensors, in_features)
    return found[1] if found else None


def _first(fmt: WeightFormat, x: torch.Tensor, tensors: dict, in_features: int):
    for entry in _FAST.get((fmt.name, x.device.type), ()):
        if entry[0](fmt, x, tensors, in_features):
            return entry
    return None


def frozen_linear(fmt: WeightFormat, tensors: dict, in_features: int, x: torch.Tensor,
                  cache: Optional[dict] = None) -> Optional[Callable]:
    """For inputs like ``x`` (dtype, device, rows): ``x2 [M, in_features] -> x2 @ W^T`` as a function that
    ``torch.compile`` traces without a graph break (the fast path's kernel as one opaque op over its prepared
    layout), or None where the path that would run has no such form (the reference, the Triton paths)."""
    found = _first(fmt, x, tensors, in_features)
    return found[2](fmt, tensors, in_features, x.dtype, cache) if found and found[2] else None


def fused_linear(items: list, x: torch.Tensor) -> Optional[Callable]:
    """For weights that all multiply inputs like ``x``: ``x2 [M, in_features] -> [M, sum of their N]`` as one
    traceable kernel call (``frozen_linear``'s form), where one fast path takes them all and can stack them; else
    None. ``items``: (fmt, tensors, in_features, cache) per weight."""
    found = [_first(fmt, x, tensors, k) for fmt, tensors, k, _ in items]
    if not found or found[0] is None or found[0][3] is None or any(f is not found[0] for f in found):
        return None
    return found[0][3](items, x.dtype)


_WARNED: set = set()


def _warn_reference(fmt: WeightFormat, x: torch.Tensor, w: torch.Tensor) -> None:
    """On an accelerator the reference path is slow: say so once per format and shape (``w``: the dequantized
    weight, whose rows are the layer's outputs whatever the format's packed tensors hold a row)."""
    if x.device.type == "cpu":
        return
    shape = tuple(w.shape)
    key = (fmt.describe(), shape, x.dtype)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"llmcomp: no fast kernel for {fmt.describe()} at {shape[0]}x{shape[1]} with {x.dtype} "
                      "inputs; using the reference dequantize + matmul.", stacklevel=3)


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
    fn = fast_path(fmt, x, tensors, in_features)
    if fn is not None:
        return fn(x, fmt, tensors, in_features, bias, cache)
    w = cached(cache, (x.dtype, x.device), tensors, lambda: fmt.dequantize(tensors, in_features, dtype=x.dtype))
    _warn_reference(fmt, x, w)
    return F.linear(x, w, bias)


def outlier_correction(x: torch.Tensor, fmt, tensors: dict, in_features: int, cache: Optional[dict] = None
                       ) -> torch.Tensor:
    """For the ``outliers`` format: ``x @ (W − W_base)ᵀ``, non-zero only at the outliers' positions —
    added to the base format's product, this is the product with the full weight. ``cache`` keeps the
    (rows, cols, delta) triple so the base is dequantized once per weight, not per call."""
    def build():
        base = fmt.base.dequantize(tensors, in_features, dtype=torch.float32)
        idx = tensors["outlier_index"].to(torch.int64)
        return (idx // in_features, idx % in_features,
                (tensors["outlier_value"].float() - base.view(-1)[idx]).to(x.dtype), base.shape[0])

    sparse = cached(cache, ("outliers", x.dtype), tensors, build)
    rows, cols, delta, out_f = sparse
    x2 = x.reshape(-1, in_features)
    out = torch.zeros(x2.shape[0], out_f, dtype=x.dtype, device=x.device)
    out.index_add_(1, rows, x2[:, cols] * delta)
    return out.reshape(*x.shape[:-1], out_f)


def _outlier_fast_path(device_type: str) -> None:
    """``outliers`` on an accelerator: the base format's fast path plus the sparse correction (the
    base's dequantized values at the outlier positions are computed once and cached)."""

    def supports(fmt, x, tensors, in_features):
        return fast_path(fmt.base, x, tensors, in_features) is not None

    def fn(x, fmt, tensors, in_features, bias=None, cache=None):
        base_fn = fast_path(fmt.base, x, tensors, in_features)
        base_cache = cache.setdefault("base", {}) if cache is not None else None
        sparse_cache = cache.setdefault("sparse", {}) if cache is not None else None
        y = base_fn(x, fmt.base, tensors, in_features, bias, base_cache)
        return y + outlier_correction(x, fmt, tensors, in_features, sparse_cache)

    register_fast_path("outliers", device_type, supports, fn)


def _register_builtin() -> None:
    """Fast paths for CUDA: the CUDA C++ mma kernels (uniform 2/3/4-bit, the E2M1 formats, codebook 4-vectors and
    PVQ groups of a multiple of 16 rows, compiled at first use), then Triton (uniform 2/4/8-bit; the codebook format
    at M ≤ 8 when LLMCOMP_CODEBOOK_KERNEL=1) where it is importable; CPU needs none. Each one's ``supports`` checks
    shapes and dtypes, so anything it cannot take falls through to the next path and finally the reference."""

    def cuda_supports(fmt, x, tensors, in_features):
        from llmcomp.kernels import uniform_cuda

        return uniform_cuda.supports(fmt, x, tensors["weight_packed"].shape[0])

    def cuda_fn(x, fmt, tensors, in_features, bias=None, cache=None):
        from llmcomp.kernels import uniform_cuda

        return uniform_cuda.linear(x, fmt, tensors, in_features, bias, cache)

    def cuda_freeze(fmt, tensors, in_features, dtype, cache=None):
        from llmcomp.kernels import uniform_cuda

        return uniform_cuda.frozen(fmt, tensors, in_features, dtype, cache)

    def cuda_fuse(items, dtype):
        from llmcomp.kernels import uniform_cuda

        return uniform_cuda.fuse(items, dtype)

    from llmcomp.kernels.uniform_cuda import E2M1_FORMATS

    for name in ("uniform", *E2M1_FORMATS):
        register_fast_path(name, "cuda", cuda_supports, cuda_fn, cuda_freeze, cuda_fuse)

    def vq_supports(fmt, x, tensors, in_features):
        from llmcomp.kernels import codebook_cuda

        return codebook_cuda.supports(fmt, x, tensors["index0"].shape[0], in_features)

    def vq_fn(x, fmt, tensors, in_features, bias=None, cache=None):
        from llmcomp.kernels import codebook_cuda

        return codebook_cuda.linear(x, fmt, tensors, in_features, bias, cache)

    def vq_freeze(fmt, tensors, in_features, dtype, cache=None):
        from llmcomp.kernels import codebook_cuda

        return codebook_cuda.frozen(fmt, tensors, in_features, dtype, cache)

    def vq_fuse(items, dtype):
        from llmcomp.kernels import codebook_cuda

        return codebook_cuda.fuse(items, dtype)

    # the CUDA kernels (4-vectors, group 0): the mma kernel, the lookup-table GEMV at one row
    register_fast_path("codebook", "cuda", vq_supports, vq_fn, vq_freeze, vq_fuse)

    def pvq_supports(fmt, x, tensors, in_features):
        from llmcomp.kernels import pyramid_cuda

        return pyramid_cuda.supports(fmt, x, tensors["weight_index"].shape[0] * fmt.dim, in_features)

    def pvq_fn(x, fmt, tensors, in_features, bias=None, cache=None):
        from llmcomp.kernels import pyramid_cuda

        return pyramid_cuda.linear(x, fmt, tensors, in_features, bias, cache)

    def pvq_freeze(fmt, tensors, in_features, dtype, cache=None):
        from llmcomp.kernels import pyramid_cuda

        return pyramid_cuda.frozen(fmt, tensors, in_features, dtype, cache)

    register_fast_path("pyramid", "cuda", pvq_supports, pvq_fn, pvq_freeze)  # PVQ: decoded once to 4-bit codes
    _outlier_fast_path("cuda")
    try:
        import triton  # noqa: F401
    except ImportError:
        return

    def supports(fmt, x, tensors, in_features):
        from llmcomp.kernels import uniform_triton

        return uniform_triton.supports(fmt, x)

    def fn(x, fmt, tensors, in_features, bias=None, cache=None):
        from llmcomp.kernels import uniform_triton

        return uniform_triton.linear(x, fmt, tensors, in_features, bias, cache)

    register_fast_path("uniform", "cuda", supports, fn)

    def cb_supports(fmt, x, tensors, in_features):
        from llmcomp.kernels import codebook_triton

        return codebook_triton.supports(fmt, x)

    def cb_fn(x, fmt, tensors, in_features, bias=None, cache=None):
        from llmcomp.kernels import codebook_triton

        return codebook_triton.linear(x, fmt, tensors, in_features, bias, cache)

    register_fast_path("codebook", "cuda", cb_supports, cb_fn)  # opt-in: LLMCOMP_CODEBOOK_KERNEL=1


_register_builtin()
