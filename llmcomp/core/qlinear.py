"""``QuantLinear``: a drop-in for ``nn.Linear`` whose weight is stored in a registered format."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from llmcomp.formats.base import WeightFormat
from llmcomp.kernels import dequant_linear, frozen_linear, fused_linear, rows_linear

FROZEN_MAX_ROWS = 64  # the fast paths' kernels take 1..64 rows of x; more go through ``forward``


class QuantLinear(nn.Module):
    """Linear layer over packed weights. Buffers are the format's tensors (``weight_packed`` ...)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: WeightFormat,
        bias: bool = False,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self._names = []
        for name, spec in fmt.param_specs(out_features, in_features).items():
            self.register_buffer(name, torch.empty(spec.shape, dtype=spec.dtype, device=device))
            self._names.append(name)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(cls, fmt: WeightFormat, tensors: dict[str, torch.Tensor], in_features: int,
                    bias: Optional[torch.Tensor] = None, out_features: Optional[int] = None) -> "QuantLinear":
        """``out_features`` defaults to the rows of the format's first tensor (pass it for formats whose
        tensors are not row-major, e.g. ``pyramid``'s groups along the output dimension)."""
        if out_features is None:
            out_features = tensors[next(iter(fmt.param_specs(1, in_features)))].shape[0]
        ref = next(iter(tensors.values()))
        mod = cls(in_features, out_features, fmt, bias=bias is not None, device="meta")
        for name, t in tensors.items():
            setattr(mod, name, t)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        mod.to(ref.device)
        return mod

    cache_dequantized = True  # reference path: keep the dequantized weight (see kernels.dequant_linear)

    def clear_cache(self) -> None:
        """Drop the dequantized-weight cache. Edits in place are seen by their tensors' version counters, but not
        edits through ``.data`` (a tensor with a counter of its own) or inside ``torch.inference_mode``: call this
        after those."""
        self.__dict__["_wcache"] = {}

    def _load_from_state_dict(self, *args, **kwargs):
        # (the cache sees in-place edits through version counters, which inference-mode tensors lack: a state dict
        # loaded under torch.inference_mode would otherwise leave the old weights' cache in place)
        super()._load_from_state_dict(*args, **kwargs)
        self.clear_cache()

    def _apply(self, fn, recurse=True):
        self.clear_cache()
        # ``module.to(dtype)`` must move packed tensors but never recast them: a float16 scale turned
        # into bfloat16 would silently change the weights.
        packed = {n: self._buffers.pop(n) for n in self._names}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in packed.items():
                new = fn(t)
                self._buffers[n] = new if new.dtype == t.dtype else t.to(new.device)
        return self

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._names}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.dequantize(self.packed_tensors(), self.in_features, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_wcache", {}) if self.cache_dequantized and not torch.is_grad_enabled() else None
        tensors = self.packed_tensors()
        if hasattr(self.fmt, "quantize_input"):  # formats that quantize activations too (W4A4)
            x = self.fmt.quantize_input(x, tensors)
        return dequant_linear(x, self.fmt, tensors, self.in_features, self.bias, cache)

    def frozen_forward(self, dtype: torch.dtype) -> Optional[Callable]:
        """A forward for ``dtype`` inputs that ``torch.compile`` traces without a graph break: the fast path's
        kernel over its prepared layout as one opaque op (prepared now), bias and reshapes in plain torch. Inputs
        of another dtype or more than ``FROZEN_MAX_ROWS`` rows take the current ``forward``, out of the trace.
        None where the format or device has no such kernel (then keep ``forward`` out of dynamo instead)."""
        if hasattr(self.fmt, "quantize_input"):
            return None
        tensors = self.packed_tensors()
        probe = torch.empty(1, self.in_features, dtype=dtype, device=next(iter(tensors.values())).device)
        run = frozen_linear(self.fmt, tensors, self.in_features, probe, self.__dict__.setdefault("_wcache", {}))
        if run is None:
            return None
        eager = torch.compiler.disable(self.forward)
        k, bias = self.in_features, self.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != dtype or x.numel() // k > FROZEN_MAX_ROWS:
                return eager(x)
            return rows_linear(x, k, run, bias)

        return forward

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.describe()}"


def frozen_group(mods: list[QuantLinear], dtype: torch.dtype) -> Optional[list[Callable]]:
    """``frozen_forward`` for linears that a model calls on the same input (q/k/v, gate/up), sharing one kernel
    call: their weights stacked along the rows (``kernels.fused_linear``); the first member called with an input
    runs the stacked product, each member returns its columns (views), and once every member has been served the
    shared result is dropped (so nothing outlives a step and dynamo sees the same state every call). The product is
    run again when a member is called with another input tensor or a second time before the others were served (a
    buffer refilled in place between steps is never answered from the old product). Inputs of another dtype or more
    than ``FROZEN_MAX_ROWS`` rows take the member's own ``forward``. None where the members' weights cannot be
    stacked — then give each its own ``frozen_forward``. At decode sizes one launch for q/k/v and one for gate/up
    replace five. Assumes the input is not changed in place between the members' calls of one step."""
    if len(mods) < 2 or any(hasattr(m.fmt, "quantize_input") or m.in_features != mods[0].in_features for m in mods):
        return None
    items = [(m.fmt, m.packed_tensors(), m.in_features, m.__dict__.setdefault("_wcache", {})) for m in mods]
    probe = torch.empty(1, mods[0].in_features, dtype=dtype, device=next(iter(items[0][1].values())).device)
    run = fused_linear(items, probe)
    if run is None:
        return None
    k = mods[0].in_features
    state = {"x": None, "y": None}
    served = [False] * len(mods)
    bounds = [0]
    for m in mods:
        bounds.append(bounds[-1] + m.out_features)

    def member(i: int, mod: QuantLinear) -> Callable:
        eager = torch.compiler.disable(mod.forward)
        lo, hi, bias = bounds[i], bounds[i + 1], mod.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dtype != dtype or x.numel() // k > FROZEN_MAX_ROWS:
                return eager(x)
            if state["x"] is not x or served[i]:
                state.update(x=x, y=run(x.reshape(-1, k)))
                for j in range(len(served)):
                    served[j] = False
            y = state["y"][:, lo:hi]
            served[i] = True
            if all(served):
                state.update(x=None, y=None)
                for j in range(len(served)):
                    served[j] = False
            return member_output(y, bias, x.shape[:-1])

        forward.call, forward.cols = run, (lo, hi)  # (norm_split: the stacked call, this member's columns)
        return forward

    return [member(i, m) for i, m in enumerate(mods)]


def member_output(y: torch.Tensor, bias, lead: tuple) -> torch.Tensor:
    """A stacked call's member: its columns ``y`` [rows, n] plus its bias, in the input's leading shape."""
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, y.shape[-1])


def frozen_glu(gate: nn.Module, up: nn.Module, dtype: torch.dtype) -> Optional[Callable]:
    """``x -> silu(gate(x)) · up(x)`` for ``dtype`` inputs over one interleaved copy of the two weights
    (``uniform_cuda.glu``): at decode sizes one traceable kernel call with the activation in the GEMM's epilogue,
    above them the copy dequantized; None where that kernel cannot take these weights (not both uniform or both E2M1
    — mxfp4, nvfp4, fp4 with E2M1 elements — QuantLinears of one format and shape without bias, not on a GPU with the
    extension). NVFP4's two tensor scales may differ (``uniform_cuda.prepare_glu`` folds each into its rows)."""
    from llmcomp.kernels import uniform_cuda

    mods = (gate, up)
    if (not all(isinstance(m, QuantLinear) for m in mods) or any(m.bias is not None for m in mods)
            or not uniform_cuda.glu_format(gate.fmt)
            or hasattr(gate.fmt, "quantize_input")  # (the kernel's own checks assume these formats)
            or gate.fmt.describe() != up.fmt.describe() or gate.in_features != up.in_features
            or gate.out_features != up.out_features):
        return None
    tensors = [m.packed_tensors() for m in mods]
    device = next(iter(tensors[0].values())).device
    if device.type != "cuda" or uniform_cuda.extension() is None:
        return None
    probe = torch.empty(1, gate.in_features, dtype=dtype, device=device)
    if not uniform_cuda.supports(gate.fmt, probe, 2 * gate.out_features):
        return None
    run = uniform_cuda.glu(gate.fmt, tensors[0], tensors[1], gate.in_features, dtype)
    if run is None:
        return None
    k = gate.in_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        return rows_linear(x, k, run, None)

    forward.call = run  # (norm_split.split_norms calls it with the norm's consumer epilogue)
    return forward


def untie_quantized_head(model: nn.Module, config) -> None:
    """A quantized lm_head has tensors of its own: ``config`` (the model's config, or its JSON as a dict) stops
    tying it to the embedding, or transformers would tie a ``weight`` onto it that its forward never reads."""
    if not isinstance(model.get_output_embeddings(), QuantLinear):
        return
    for c in (config, config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)):
        if isinstance(c, dict) and c.get("tie_word_embeddings"):
            c["tie_word_embeddings"] = False
        elif c is not None and not isinstance(c, dict) and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
