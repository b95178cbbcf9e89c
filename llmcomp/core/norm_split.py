"""A decoder layer's second RMSNorm (after attention, before the gated MLP) split around the two kernel calls
beside it, so that it needs no kernel of its own at decode sizes (``compiled_layers``' ``norm``):

- the o projection's call also writes, in its epilogue, h = residual + o(x), γ ⊙ h and Σ h² over each 16 columns
  (``uniform_cuda.norm_producer_op``);
- the norm then returns γ ⊙ h as it is, and the GLU call (gate/up and SiLU-mul, ``qlinear.frozen_glu``) scales each
  token by rsqrt(mean h² + eps) in its epilogue (``norm_consumer_op``): W · (γ ⊙ h) · r = W · norm(h).

The layer's own code is left as it is: its ``residual + attention`` add still happens (in the kernel that adds the
MLP's output, where the compiler fuses it), but the norm no longer reads it. The pieces meet through a per-layer dict
that the layer's forward clears and fills with the layer's input (the residual) before it runs; every piece falls
back to what it did before when the dict lacks its part (more rows than the kernel takes, another dtype).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# Layers whose forward is ``h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))``
# with an attention that returns o_proj's output as it is (transformers' source, 4.5x–5.x).
LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def rms_eps(norm: nn.Module, dtype: torch.dtype, device) -> Optional[float]:
    """The norm's eps where it computes γ · T(x · rsqrt(mean x² + eps)) (LlamaRMSNorm and its copies), checked on
    a probe input; None for any other norm (Gemma's 1 + γ, LayerNorm's mean)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    w = getattr(norm, "weight", None)
    if not isinstance(eps, float) or not isinstance(w, torch.Tensor) or w.dim() != 1 or w.dtype != dtype:
        return None
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.numel(), generator=g) * 3 + 1).to(device=device, dtype=dtype)
    with torch.no_grad():
        got = norm(x)
        xf = x.float()
        want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    if got.dtype != want.dtype or got.shape != want.shape:
        return None
    return eps if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=1e-2) else None


def split_norm(layer: nn.Module, glu_call, dtype: torch.dtype) -> Optional[list[tuple[nn.Module, Callable]]]:
    """The (module, forward) swaps that split ``layer``'s post-attention norm (see the module's docstring), to be
    applied after the layer's quantized linears and its MLP (through ``glu_call``, a ``uniform_cuda.GluCall``) were
    swapped for their kernel calls; None where the layer is not one of ``LAYERS``, its norm is no plain RMSNorm, or
    its o projection has no uniform kernel call in ``dtype``."""
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.kernels import frozen_linear, rows_linear
    from llmcomp.kernels import uniform_cuda as uc

    attn, norm, mlp = (getattr(layer, n, None) for n in ("self_attn", "post_attention_layernorm", "mlp"))
    o = getattr(attn, "o_proj", None)
    if (type(layer).__name__ not in LAYERS or not isinstance(glu_call, uc.GluCall) or not isinstance(o, QuantLinear)
            or o.bias is not None or not isinstance(norm, nn.Module) or not isinstance(mlp, nn.Module)
            or o.out_features % 16 or o.out_features != glu_call.in_features):
        return None
    tensors = o.packed_tensors()
    device = next(iter(tensors.values())).device
    probe = torch.empty(1, o.in_features, dtype=dtype, device=device)
    call = frozen_linear(o.fmt, tensors, o.in_features, probe, o.__dict__.setdefault("_wcache", {}))
    eps = rms_eps(norm, dtype, device)
    if type(call) is not uc.FrozenCall or eps is None:
        return None
    ctx: dict = {}
    k, n, gamma = o.in_features, o.out_features, norm.weight.detach()
    layer_forward, o_forward, norm_forward, mlp_forward = layer.forward, o.forward, norm.forward, mlp.forward
    down = mlp.down_proj

    def layer_fwd(*args, **kwargs):
        ctx.clear()
        ctx["res"] = args[0] if args else kwargs.get("hidden_states")
        out = layer_forward(*args, **kwargs)
        ctx.clear()
        return out

    def o_fwd(x: torch.Tensor) -> torch.Tensor:
        res, rows = ctx.get("res"), x.numel() // k
        ctx["g"] = ctx["sq"] = None
        if (x.dtype != dtype or rows > uc.MAX_M or not isinstance(res, torch.Tensor)
                or tuple(res.shape) != (*x.shape[:-1], n)):
            return o_forward(x)
        y, g, sq = uc.norm_producer_op(x.reshape(rows, k), *call.args, res.reshape(rows, n), gamma)
        ctx["g"], ctx["sq"] = g.view(*x.shape[:-1], n), sq
        return y.view(*x.shape[:-1], n)

    def norm_fwd(h: torch.Tensor) -> torch.Tensor:
        g = ctx.pop("g", None)
        return norm_forward(h) if g is None else g

    def mlp_fwd(x: torch.Tensor) -> torch.Tensor:
        sq = ctx.pop("sq", None)
        if sq is None:
            return mlp_forward(x)
        consumer = lambda x2: uc.norm_consumer_op(x2, *glu_call.args, sq, eps, 1)  # noqa: E731
        return down(rows_linear(x, n, consumer, None))

    return [(layer, layer_fwd), (o, o_fwd), (norm, norm_fwd), (mlp, mlp_fwd)]
