"""Llama-style decoder layers' RMSNorms split into the epilogues of the quantized kernel calls around them, so that at
decode sizes they need no kernel of their own (``compiled_layers``' ``norm``; csrc ``EpiArgs``):

- a producer call (the o projection; the down projection for the next layer's input norm) also writes, in its
  epilogue, h = residual + its output, γ ⊙ h and Σ h² over each 16 columns (``uniform_cuda.norm_producer_op``);
- the norm then returns γ ⊙ h as it is, and the consumer call (the GLU call; the stacked q/k/v) scales each token by
  rsqrt(mean h² + eps) in its epilogue (``norm_consumer_op``): W · (γ ⊙ h) · r = W · norm(h).

Post-attention norm: o → the GLU call, wherever a layer has both. Input norm of layer i + 1: layer i's down → layer
i + 1's q/k/v, where layer i's post-attention norm is split too (its h = residual + o(x) is down's residual) — then
layer i returns down's h, and its own ``residual + …`` adds are left unused (inductor drops them). The layers'
code is left as it is: the pieces meet through a dict that each layer's forward resets and fills with its input; each
piece falls back to what it did before where the dict lacks its part (more rows than the kernels take, another
dtype), and layer i + 1 takes layer i's norm halves only for the very tensor layer i returned.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# Layers whose forward is ``h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))``
# with an attention that returns o_proj's output as it is and calls q/k/v on the same input (transformers' source).
LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
DTYPES = (torch.bfloat16, torch.float16)
# The consumer's input γ ⊙ h is not normalized: in fp16 it could pass 65504 where |γ| > 1 (h itself is the
# residual stream, fp16 in the model too). So in fp16 a norm is split only where max |γ| <= 1.
GAMMA_BOUND = {torch.float16: 1.0}


def gamma_fits(norm: nn.Module, dtype: torch.dtype) -> bool:
    """Whether γ ⊙ h stays within ``dtype``'s range for every h of that dtype (``GAMMA_BOUND``)."""
    bound = GAMMA_BOUND.get(dtype)
    return bound is None or float(norm.weight.detach().abs().max()) <= bound


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


def split_rows() -> int:
    """Up to how many rows (tokens a step) the norms are split: the epilogue is built into the post-scale kernel at
    M ≤ 8 only (its own instantiations, ``NORM`` in csrc), and only where that kernel serves (``post_scale``).
    (At batch 16, with the epilogue in every instantiation, the split 8B step took 3.17 ms against 2.88 without it:
    the consumer re-reads the producer's per-tile sums in every block — kernels_h200_notes.md, eighteenth session.)"""
    from llmcomp.kernels import uniform_cuda as uc

    return min(8, uc.post_scale())


def _uniform_call(mod, dtype: torch.dtype):
    """A bias-free quantized linear's ``uniform_cuda.FrozenCall`` in ``dtype`` (its prepared layout) where it has the
    post-scale kernel's scale pairs (integer codes with integral zeros, groups of whole kblocks), else None."""
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.kernels import frozen_linear

    if not isinstance(mod, QuantLinear) or mod.bias is not None or mod.out_features % 16:
        return None
    tensors = mod.packed_tensors()
    probe = torch.empty(1, mod.in_features, dtype=dtype, device=next(iter(tensors.values())).device)
    call = frozen_linear(mod.fmt, tensors, mod.in_features, probe, mod.__dict__.setdefault("_wcache", {}))
    return call if _plain_call(call) and call.args[3] is not None else None


def _plain_call(call) -> bool:
    """Whether ``call`` is one weight's (or stacked weights') ``uniform_cuda.FrozenCall``: args the ops take."""
    from llmcomp.kernels import uniform_cuda as uc

    return isinstance(call, uc.FrozenCall) and not isinstance(call, uc.GluCall)


def _plan(layer: nn.Module, dtype: torch.dtype) -> Optional[dict]:
    """What of ``layer`` can take part (see the module's docstring): None, or its post-attention split (o's call,
    the GLU call, the norm's eps) plus, where its q/k/v are one stacked call, its input norm's eps and that call."""
    from llmcomp.kernels import uniform_cuda as uc

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    post, inp = getattr(layer, "post_attention_layernorm", None), getattr(layer, "input_layernorm", None)
    o = getattr(attn, "o_proj", None)
    glu = getattr(getattr(mlp, "forward", None), "call", None)  # (compiled_layers' GLU swap)
    if (type(layer).__name__ not in LAYERS or not isinstance(glu, uc.GluCall) or not isinstance(post, nn.Module)
            or getattr(o, "out_features", None) != glu.in_features or glu.args[3] is None):
        return None
    o_call = _uniform_call(o, dtype)
    eps = rms_eps(post, dtype, glu.args[0].device) if o_call is not None else None
    if eps is None or not gamma_fits(post, dtype):
        return None
    plan = {"o": o_call, "glu": glu, "eps": eps, "hidden": o.out_features}
    members = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    fwds = [getattr(m, "forward", None) for m in members]
    calls = {id(getattr(f, "call", None)) for f in fwds}  # (compiled_layers' sibling stacking)
    qkv = getattr(fwds[0], "call", None)
    if isinstance(inp, nn.Module) and len(calls) == 1 and _plain_call(qkv) and qkv.args[3] is not None:
        in_eps = rms_eps(inp, dtype, glu.args[0].device)
        if in_eps is not None and gamma_fits(inp, dtype):
            plan.update(qkv=qkv, qkv_members=[(m, f, *f.cols) for m, f in zip(members, fwds)], in_eps=in_eps)
    return plan


def split_norms(layers, dtype: torch.dtype) -> tuple[list[tuple[nn.Module, Callable]], int]:
    """The (module, forward) swaps that split ``layers``' norms (see the module's docstring), to be applied after
    their quantized linears, stacked siblings and GLU calls were swapped for kernel calls (``compiled_layers``), and
    how many norms they split; none for activations of a dtype outside ``DTYPES``."""
    layers = list(layers)
    if dtype not in DTYPES:
        return [], 0
    plans = [_plan(layer, dtype) for layer in layers]
    state: dict = {}
    swaps, count = [], 0
    for i, (layer, plan) in enumerate(zip(layers, plans)):
        if plan is None:
            continue
        nxt = plans[i + 1] if i + 1 < len(layers) else None
        down = _uniform_call(layer.mlp.down_proj, dtype) if nxt is not None and "qkv" in nxt else None
        takes_input = i > 0 and plans[i - 1] is not None and "qkv" in plan and "down" in plans[i - 1]
        if down is not None:
            plan["down"] = down
        swaps += _layer_swaps(layer, plan, state, dtype, takes_input,
                              layers[i + 1].input_layernorm.weight.detach() if down is not None else None)
        count += 1 + takes_input
    return swaps, count


def _layer_swaps(layer, plan: dict, state: dict, dtype, takes_input: bool, next_gamma) -> list:
    from llmcomp.kernels import rows_linear
    from llmcomp.kernels import uniform_cuda as uc

    attn, mlp = layer.self_attn, layer.mlp
    o, post, down = attn.o_proj, layer.post_attention_layernorm, mlp.down_proj
    n, eps, gamma = plan["hidden"], plan["eps"], post.weight.detach()
    layer_forward, o_forward, post_forward, mlp_forward = layer.forward, o.forward, post.forward, mlp.forward
    down_forward = down.forward

    def fits(x: torch.Tensor, k: int) -> bool:
        return x.dtype == dtype and x.numel() // k <= split_rows()

    def layer_fwd(*args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        handed = state.get("next")
        state.clear()
        if takes_input and handed is not None and handed[0] is x:
            state["in"] = handed
        state["res"] = x
        out = layer_forward(*args, **kwargs)
        h, handed = state.get("h"), state.get("next")
        state.clear()
        if handed is not None:
            state["next"] = handed
        if h is None:
            return out
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def produce(x: torch.Tensor, k: int, res, call, norm_weight) -> Optional[tuple]:
        """The producer call on x [..., k] with residual ``res`` [..., n]: (y, h, γ ⊙ h) in res's shape and the
        sums; None where it does not run (more rows than ``split_rows``, another dtype, no such residual)."""
        if not fits(x, k) or not isinstance(res, torch.Tensor) or tuple(res.shape) != (*x.shape[:-1], n):
            return None
        rows = x.numel() // k
        *outs, sq = uc.norm_producer_op(x.reshape(rows, k), *call.args, res.reshape(rows, n), norm_weight)
        return (*(t.view(res.shape) for t in outs), sq)

    def o_fwd(x: torch.Tensor) -> torch.Tensor:
        made = produce(x, o.in_features, state.get("res"), plan["o"], gamma)
        if made is None:
            return o_forward(x)
        y, h, g, sq = made
        state.update(mid=h, post=(g, sq))
        return y

    def post_fwd(h: torch.Tensor) -> torch.Tensor:
        halves = state.get("post")
        return post_forward(h) if halves is None else halves[0]

    def mlp_fwd(x: torch.Tensor) -> torch.Tensor:
        halves = state.pop("post", None)
        if halves is None:
            return mlp_forward(x)
        consumer = lambda x2: uc.norm_consumer_op(x2, *plan["glu"].args, halves[1], eps, 1)  # noqa: E731
        return down(rows_linear(x, n, consumer, None))

    def down_fwd(x: torch.Tensor) -> torch.Tensor:
        made = produce(x, down.in_features, state.get("mid"), plan.get("down"), next_gamma)
        if made is None:
            return down_forward(x)
        y, h, g, sq = made
        state.update(h=h, next=(h, g, sq))
        return y

    swaps = [(layer, layer_fwd), (o, o_fwd), (post, post_fwd), (mlp, mlp_fwd)]
    if next_gamma is not None:
        swaps.append((down, down_fwd))
    if takes_input:
        inp, in_forward, in_eps = layer.input_layernorm, layer.input_layernorm.forward, plan["in_eps"]

        def in_fwd(h: torch.Tensor) -> torch.Tensor:
            halves = state.get("in")
            return in_forward(h) if halves is None else halves[1]

        swaps.append((inp, in_fwd))
        for mod, plain, lo, hi in plan["qkv_members"]:
            swaps.append((mod, _qkv_member(mod, plain, lo, hi, plan["qkv"], in_eps, state, n)))
    return swaps


def _qkv_member(mod, plain, lo: int, hi: int, call, eps: float, state: dict, k: int):
    """q, k or v of a layer whose input norm is split: the stacked call as the norm's consumer (run once, by the
    first member called), this member's columns of it, plus its bias; ``plain`` where the norm was not split."""
    from llmcomp.core.qlinear import member_output
    from llmcomp.kernels import uniform_cuda as uc

    bias = mod.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        halves = state.get("in")
        if halves is None or x is not halves[1] or x.numel() // k > split_rows():
            return plain(x)
        if "qkv" not in state:
            state["qkv"] = uc.norm_consumer_op(x.reshape(-1, k), *call.args, halves[2], eps, 0)
        return member_output(state["qkv"][:, lo:hi], bias, x.shape[:-1])

    return forward
