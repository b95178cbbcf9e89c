"""The student attention that replaces a Llama-style softmax attention, and its transformers cache layer.

``LinearAttention`` keeps the teacher's q/k/v/o projections (same parameter names, so the artifact's
tensors keep their keys) and adds what its :class:`StudentSpec` asks for: feature maps, a decay gate,
per-head window/linear mixing weights. Methods are specs (``METHODS``):

* ``hedgehog`` — trainable Hedgehog feature maps on the rotated q/k, no gate, LoLCATs' normalised
  sliding-window + linear hybrid with learned per-head mixing;
* ``liger`` — Liger: softmax feature maps on the pretrained q/k, per-feature gates built from the
  pretrained key projection (``logsigmoid(k)/16``), no new parameters; Liger Attention is
  ``0.5 · sliding-window softmax + 0.5 · gated recurrence``;
* ``gla`` — a gated linear attention whose gate projection is its own trainable copy of the teacher's
  key projection, normalised, learned mixing;
* ``mamba`` — Mamba-2 (SSD) seeding after mmMamba / MambaInLlama: C = q, B = k, x = v, out = o_proj
  (the teacher's weights), a scalar per-head decay ``exp(-softplus(dt(x)) · exp(A_log))`` with a new
  dt projection (zero weights, Mamba-2's dt / A initialisation), unnormalised. Not included: Mamba's
  short convolution, D skip and gated output norm.

Generation: the student keeps its recurrent state in a :class:`LinearCacheLayer` inside whatever
transformers ``Cache`` the model runs with (``generate``'s ``DynamicCache`` included): the first time a
layer sees a cache, its empty slot is replaced by a ``LinearCacheLayer``. Decode memory is the
``HybridState``: O(window), independent of the context length. Padding masks are not applied to the
linear layers (batches of equal-length sequences).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from llmcomp.core.config import register_config
from llmcomp.core.model import ROPE_ATTENTION, is_rope_attention
from llmcomp.errors import UserError
from llmcomp.linearize.attention import HybridState, hybrid_attention
from llmcomp.linearize.feature_maps import FEATURE_MAPS

GATES = ("none", "key", "proj", "dt")  # dt: one scalar per head and token (Mamba-2)


@register_config
@dataclass(frozen=True)
class StudentSpec:
    """What a linearized layer computes (recorded in the manifest; rebuilt at load)."""

    feature_map: str = "hedgehog"  # hedgehog | softmax
    feature_dim: int = 0  # hedgehog: features per sign (0 = head_dim)
    rotary_features: bool = True  # feature maps read q/k after RoPE (LoLCATs) or before (Liger)
    gate: str = "none"  # none | key (from the pretrained k_proj) | proj (own projection, initialised from k_proj) | dt
    gate_normalizer: float = 16.0  # g = logsigmoid(·) / normalizer (GLA's choice)
    window: int = 64  # sliding-window softmax size; 0 = pure linear attention
    normalize: bool = True  # one normaliser over both parts (LoLCATs) vs unnormalised sum (Liger)
    learn_mix: bool = True  # per-head learned window/linear weights, else fixed 0.5 / 0.5
    chunk_size: int = 64  # chunked form (per-feature gates use at most 16)

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise UserError(f"Unknown feature map {self.feature_map!r}; choose one of: "
                            f"{', '.join(FEATURE_MAPS.names())}.")
        if self.gate not in GATES:
            raise UserError(f"Unknown gate {self.gate!r}; choose one of: {', '.join(GATES)}.")
        if self.gate in ("key", "proj") and self.feature_map != "softmax":
            raise UserError("Decay gates need the softmax feature map (one gate per key feature = head dim).")
        if self.window < 0:
            raise UserError("--window must be ≥ 0 (0 = pure linear attention).")
        if self.chunk_size < 1 or self.feature_dim < 0:
            raise UserError(f"A student's chunk size must be ≥ 1 and its feature dimension ≥ 0, got {self.chunk_size} "
                            f"and {self.feature_dim}.")


METHODS = {
    "hedgehog": StudentSpec(),
    "liger": StudentSpec(feature_map="softmax", rotary_features=False, gate="key", normalize=False, learn_mix=False),
    "gla": StudentSpec(feature_map="softmax", rotary_features=False, gate="proj", normalize=True, learn_mix=True),
    "mamba": StudentSpec(feature_map="identity", rotary_features=False, gate="dt", normalize=False, learn_mix=True),
}


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, Hkv, T, D] → [B, Hkv·n, T, D] (each KV head for its query heads)."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


class LinearCacheLayer(CacheLayerMixin):
    """A transformers cache layer that holds a linear-attention layer's ``HybridState`` (no growing KV)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.state: HybridState | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, *args, **kwargs):
        raise RuntimeError("A linear-attention cache layer holds a recurrent state, not keys and values.")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(beam_idx)

    def offload(self):
        pass

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def dense_nbytes(self, kv_heads: int, head_dim: int, element_size: int) -> int:
        """The keys and values the softmax layer it replaced would hold for the tokens seen (its state's batch)."""
        if self.state is None:
            return 0
        return 2 * self.state.S.shape[0] * kv_heads * self.state.seen * head_dim * element_size

    def _unsupported(self, *args, **kwargs):
        raise UserError("Linear-attention layers cannot crop or split their cache (no assisted generation).")

    crop = batch_repeat_interleave = batch_select_indices = _unsupported


def cache_layer(cache, idx: int) -> LinearCacheLayer:
    """The ``LinearCacheLayer`` for layer ``idx`` in ``cache``, installed in place of an empty slot."""
    layers = cache.layers
    while len(layers) <= idx:
        make = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        layers.append(make())
    layer = layers[idx]
    if isinstance(layer, LinearCacheLayer):
        return layer
    if "Static" in type(layer).__name__:  # (a hybrid's softmax layers then attended over unwritten slots)
        raise UserError("A linearized model decodes with the default (dynamic) cache; a static cache "
                        "(cache_implementation='static') is not supported.")
    if getattr(layer, "is_initialized", False):
        raise RuntimeError(f"Cache slot {idx} already holds keys/values; a linear-attention layer cannot use it.")
    layers[idx] = LinearCacheLayer()
    return layers[idx]


class LinearAttention(nn.Module):
    """Drop-in replacement for a Llama-style attention (see the module docstring)."""

    def __init__(self, attn: nn.Module, spec: StudentSpec):
        super().__init__()
        name = type(attn).__name__
        if not is_rope_attention(attn):  # (check_supported's test: the name alone let an older forward through)
            raise UserError(f"linearize does not support the attention class {name}; supported: "
                            f"{', '.join(ROPE_ATTENTION)}.")
        cfg = attn.config
        self.config, self.layer_idx, self.spec = cfg, attn.layer_idx, spec
        self.head_dim = attn.head_dim
        self.num_heads = cfg.num_attention_heads
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.is_causal, self.attention_dropout = True, 0.0
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        w = attn.q_proj.weight
        fm = FEATURE_MAPS.get(spec.feature_map)
        self.feature_map_q = fm(self.num_heads, self.head_dim, spec.feature_dim, device=w.device, dtype=w.dtype)
        self.feature_map_k = fm(self.num_heads, self.head_dim, spec.feature_dim, device=w.device, dtype=w.dtype)
        if spec.gate == "proj":
            k = attn.k_proj
            self.gate_proj = nn.Linear(k.in_features, k.out_features, bias=k.bias is not None, device=w.device,
                                       dtype=w.dtype)
            if w.device.type != "meta":
                with torch.no_grad():
                    self.gate_proj.weight.copy_(k.weight)
                    if k.bias is not None:
                        self.gate_proj.bias.copy_(k.bias)
        if spec.gate == "dt":  # Mamba-2 init: dt log-uniform in [1e-3, 1e-1] (through the bias), A in [1, 16]
            self.dt_proj = nn.Linear(attn.q_proj.in_features, self.num_heads, device=w.device, dtype=w.dtype)
            self.A_log = nn.Parameter(torch.empty(self.num_heads, device=w.device, dtype=w.dtype))
            if w.device.type != "meta":
                with torch.no_grad():
                    self.dt_proj.weight.zero_()
                    dt = torch.exp(torch.rand(self.num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
                    self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
                    self.A_log.copy_(torch.log(torch.empty(self.num_heads).uniform_(1, 16)))
        if spec.learn_mix:
            self.mix_logit = nn.Parameter(torch.zeros(self.num_heads, device=w.device, dtype=w.dtype))
        self.teacher_mode = False  # distillation: compute the original softmax attention instead

    def mix(self, device=None):
        """(window weight, linear weight) per head [H], float32 (learned: sigmoid and its complement). The fixed
        halves go on ``device``, the input's: a quantized or offloaded ``q_proj`` has no usable ``weight``."""
        if hasattr(self, "mix_logit"):
            a = torch.sigmoid(self.mix_logit.float())
            return a, 1 - a
        if not self.spec.window:
            return None, None
        half = torch.full((self.num_heads,), 0.5, device=device)
        return half, half

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        B, n, _ = hidden_states.shape
        shape = (B, n, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H, n, D]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # [B, Hkv, n, D]
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        qr, kr = _rope(q, k, cos, sin)
        if self.teacher_mode:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](self, qr, kr, v, attention_mask, dropout=0.0, scaling=self.scaling)
            return self.o_proj(out.reshape(B, n, -1).contiguous()), None
        spec, rep = self.spec, self.num_key_value_groups
        f32 = lambda t: t.float()  # noqa: E731  (the recurrence runs in float32 whatever the model dtype)
        kr_, v_ = f32(_repeat(kr, rep)), f32(_repeat(v, rep))
        qf, kf = (qr, kr_) if spec.rotary_features else (q, _repeat(k, rep))
        fq, fk = self.feature_map_q(f32(qf)), self.feature_map_k(f32(kf))
        g = None
        if spec.gate == "dt":
            dt = F.softplus(f32(self.dt_proj(hidden_states)))  # [B, n, H]
            g = (-dt * self.A_log.float().exp()).transpose(1, 2)  # [B, H, n]
        elif spec.gate != "none":
            src = k if spec.gate == "key" else self.gate_proj(hidden_states).view(shape).transpose(1, 2)
            g = F.logsigmoid(f32(_repeat(src, rep))) / spec.gate_normalizer  # [B, H, n, D]
        layer = cache_layer(cache, self.layer_idx) if cache is not None else None
        state = layer.state if layer is not None else None
        a, b = self.mix(hidden_states.device)
        chunk = min(spec.chunk_size, 16) if g is not None and g.dim() == 4 else spec.chunk_size
        o, new_state = hybrid_attention(f32(qr), kr_, fq, fk, v_, g, window=spec.window, scale=self.scaling,
                                        window_weight=a, linear_weight=b, normalize=spec.normalize, state=state,
                                        recurrent=n == 1 and state is not None, chunk_size=chunk)
        if layer is not None:
            layer.state = new_state
        o = o.to(hidden_states.dtype).transpose(1, 2).reshape(B, n, -1)
        return self.o_proj(o), None


def attention_of(layer: nn.Module) -> nn.Module:
    attn = getattr(layer, "self_attn", None)
    if not isinstance(attn, nn.Module):
        raise UserError(f"linearize does not support the decoder layer {type(layer).__name__}: no self_attn module.")
    return attn


def check_supported(model: nn.Module) -> None:
    """Every decoder layer's attention must be a class the student can replace (named in the error)."""
    from llmcomp.core.model import decoder_layers

    prefix, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        attn = attention_of(layer)
        name = type(attn).__name__
        if not is_rope_attention(attn) and not isinstance(attn, LinearAttention):
            raise UserError(f"linearize does not support the attention class {name} ({prefix}.{i}.self_attn); "
                            f"supported: {', '.join(ROPE_ATTENTION)}.")


def install(model: nn.Module, students: dict[int, LinearAttention]) -> None:
    from llmcomp.core.model import decoder_layers

    _, layers = decoder_layers(model)
    for i, student in students.items():
        layers[i].self_attn = student
    if students and not getattr(model, "_llmcomp_refuses_padding", False):
        model.register_forward_pre_hook(_refuse_padding, with_kwargs=True)
        model._llmcomp_refuses_padding = True


def _refuse_padding(module, args, kwargs):
    """The linear state and the window read every token: a padded batch (a 2-D attention mask with zeros, as
    ``generate`` builds for prompts of different lengths) would decode wrongly, without a sign."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # forward(input_ids, attention_mask, …)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
        raise UserError("A linearized model takes batches of equal-length sequences: its linear attention has no "
                        "padding mask. Run prompts of different lengths one at a time.")


def students_of(model: nn.Module) -> list[LinearAttention]:
    return [m for m in model.modules() if isinstance(m, LinearAttention)]


@contextlib.contextmanager
def teacher_mode(model: nn.Module):
    """Every student computes the original softmax attention (LoRA adapters off) inside the block."""
    from llmcomp.linearize.lora import lora_disabled

    students = students_of(model)
    for s in students:
        s.teacher_mode = True
    try:
        with lora_disabled(model):
            yield
    finally:
        for s in students:
            s.teacher_mode = False
