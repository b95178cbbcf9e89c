"""Grouped-query attention for one query token without copying K and V: the decode runner's attention.

With a ``StaticCache`` the attention mask is never None, so transformers' SDPA path repeats each key/value head for
its ``groups`` query heads (``repeat_kv``: two copies of the whole cache a layer and step) — on an 8B shape at batch
1 that was 64 copy kernels, ~0.44 ms of a 5 ms W4 step (bench/results/decode_h200_breakdown.json); transformers' own
packing of one query token is skipped under torch.compile and absent from older releases. Here a decode step's
query ``[B, H, 1, D]`` is read as ``[B, H / groups, groups, D]`` — each key/value head's query heads as a query
length — so the attention runs on the cache as it is, the mask ``[B, 1, 1, L]`` broadcasting over the group: by
default in one split-KV Triton kernel (``llmcomp.kernels.decode_attention``) on CUDA, else as two batched GEMMs or
SDPA. Anything else
(prefill, a per-head mask, position bias, soft-capping) goes to transformers' SDPA function unchanged.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

NAME = "llmcomp_packed_gqa"


def packed_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    b, h, q_len, d = query.shape
    plain = (groups == 1 or q_len != 1 or dropout or kwargs.get("position_bias") is not None
             or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
             or (attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                                                 or attention_mask.shape[2] != 1)))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    how = kernel()
    scale = d ** -0.5 if scaling is None else scaling
    if how in ("auto", "triton") and (attention_mask is None or attention_mask.shape[-1] == key.shape[-2]):
        from llmcomp.kernels import decode_attention as split_kv

        q3 = query.reshape(b, h, d)
        if split_kv.supports(q3, key, value, groups):
            out = split_kv.decode_attention(q3, key, value, attention_mask, float(scale))
            return out.reshape(b, 1, h, d), None
    q = query.reshape(b, h // groups, groups, d)
    if how == "matmul" or (how in ("auto", "triton", "torch") and b == 1):
        # scores, softmax in fp32, values: two batched GEMMs that torch.compile fuses around
        scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale
        if attention_mask is not None:
            scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                      else scores + attention_mask.float())
        out = torch.matmul(scores.softmax(-1).to(value.dtype), value)
    else:
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def kernel() -> str:
    """``LLMCOMP_DECODE_ATTENTION``: how the packed decode step attends — ``auto`` (default: the split-KV Triton
    kernel, ``llmcomp.kernels.decode_attention``, where it applies; else two GEMMs at batch 1, SDPA above),
    ``triton`` (the same), ``torch`` (the GEMMs at batch 1, SDPA above), ``matmul`` or ``sdpa``. H200, 8 layers of the 8B shape compiled
    (decode_h200_8layers_attn_*.json): at batch 1 the GEMMs took 1.00 / 1.63 ms a step (W4 / bf16) against SDPA's
    1.05 / 1.68 (cuDNN's flash kernel, ~16 µs a layer on 8 heads × 4 queries); at batch 16 SDPA was ahead
    (1.30 / 1.76 against 1.33 / 1.79)."""
    return os.environ.get("LLMCOMP_DECODE_ATTENTION", "auto").strip()


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, packed_gqa_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the same masks as SDPA


@contextlib.contextmanager
def packed_gqa(model: torch.nn.Module, enabled: bool = True):
    """While open: ``model`` (a transformers model on SDPA attention) decodes with ``packed_gqa_attention``; yields
    whether it does (not for other attention implementations, e.g. eager or flash, nor where ``enabled`` is
    False). The configs' attention implementation is put back on exit."""
    configs = [m.config for m in model.modules() if hasattr(m, "config")
               and getattr(m.config, "_attn_implementation", None) == "sdpa"] if enabled else []
    configs = list({id(c): c for c in configs}.values())
    if not configs:
        yield False
        return
    _register()
    try:
        for c in configs:
            c._attn_implementation_internal = NAME
        yield True
    finally:
        for c in configs:
            c._attn_implementation_internal = "sdpa"


# Attention modules whose forward is transformers' Llama one (q/k/v projections, optional per-head q/k norms, rotary
# embedding, ``cache.update``, the attention function, o): ``rope_forward`` re-implements its decode step.
ROPE_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


# Set on the static cache layers that count their length in another layer's tensor and do not advance it
# (``decode_bench.share_position``): a plain attribute, read as such under dynamo (a bound method's identity is not).
COUNTER_SHARED = "_llmcomp_counter_shared"


def _advances(layer) -> bool:
    """Whether a static cache layer's step advances its length counter (transformers' ``StaticLayer.update`` does;
    the layers of a shared counter but its owner do not)."""
    return not getattr(layer, COUNTER_SHARED, False)


def rope_forward(attn: torch.nn.Module):
    """A forward for ``attn`` whose decode step (one token a sequence, a full-attention ``StaticLayer`` cache, this
    module's packed attention, a [B, 1, 1, L] mask) runs the rotary embedding, the cache write and the attention as
    one kernel launch (``llmcomp::decode_attention_rope``) instead of a fused rotary/cache-write kernel and the
    attention's; the step's counter is advanced as the layer's ``update`` would. Anything else runs the module's
    forward as it was. None for modules that are not ``ROPE_ATTENTION`` ones (or have a sliding window)."""
    if type(attn).__name__ not in ROPE_ATTENTION or getattr(attn, "sliding_window", None) is not None:
        return None
    if type(attn).__name__ == "MistralAttention" and getattr(attn.config, "sliding_window", None) is not None:
        return None  # (Mistral's attention passes the config's window on: not the module's attribute)
    if not all(isinstance(getattr(attn, n, None), torch.nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    original = attn.forward
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        return None

    def forward(*args, **kwargs):
        from transformers.cache_utils import StaticLayer

        from llmcomp.kernels.decode_attention import decode_attention_rope

        x = args[0] if args else kwargs.get("hidden_states")
        cos_sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        layer = layers[attn.layer_idx] if layers is not None and attn.layer_idx < len(layers) else None
        if (not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != 1 or cos_sin is None or attn.training
                or type(layer) is not StaticLayer or not layer.is_initialized
                or attn.config._attn_implementation != NAME or kernel() not in ("auto", "triton")
                or not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
                or mask.shape[-1] != layer.keys.shape[2] or layer.keys.dtype != x.dtype or len(args) > 3):
            return original(*args, **kwargs)
        b, d = x.shape[0], attn.head_dim
        cos, sin = cos_sin
        if cos.shape != (b, 1, d) or sin.shape != (b, 1, d):
            return original(*args, **kwargs)
        q = attn.q_proj(x).view(b, 1, -1, d)
        k = attn.k_proj(x).view(b, 1, -1, d)
        v = attn.v_proj(x).view(b, 1, -1, d)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        out = decode_attention_rope(q.reshape(b, -1, d), k.reshape(b, -1, d), v.reshape(b, -1, d),
                                    cos.reshape(b, d), sin.reshape(b, d), layer.keys, layer.values,
                                    layer.cumulative_length, mask, float(attn.scaling))
        if _advances(layer):
            layer.cumulative_length.add_(1)
        return attn.o_proj(out.reshape(b, 1, -1)), None

    return forward
