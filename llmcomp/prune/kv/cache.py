"""The transformers ``Cache`` that applies a KV policy, and the hooks that make a model use it.

How a policy reaches ``model.generate`` with no other code (``install``):

1. An attention function ``"llmcomp_kv"`` is registered with transformers' ``AttentionInterface``
   (plus SDPA's mask function under the same name) and set as the model's attention implementation.
2. A forward pre-hook on the decoder swaps the empty ``DynamicCache`` that ``generate`` (or a
   ``use_cache`` forward) creates for a ``KVCache`` whose layers apply the policy. A cache the user
   built (``generate(past_key_values=...)`` / ``cache=...``) or ``use_cache=False`` is left alone: then the attention
   function falls back to SDPA and the model runs dense.
3. Each ``PolicyLayer.update`` only stages the new keys/values; the attention function then asks the
   layer to ``attend``: the layer computes attention over what it holds plus the new tokens (dense
   within the new chunk, as prefill does) and afterwards stores the new tokens in its compressed /
   evicted form. Scored eviction gets the attention probabilities it needs without the user switching
   the model to eager attention.

Logical vs physical length: ``get_seq_length`` is the number of tokens seen (positions and RoPE stay
those of the original sequence); ``get_mask_sizes`` asks HF for a mask over all seen tokens, and each
layer keeps the columns of the tokens it still holds (so padding stays masked after eviction).
``KVCache.nbytes`` is the sum of the tensors the layers hold on the device, metadata included.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from llmcomp.core.hfcompat import cache_kwarg, pop_cache
from llmcomp.core.model import ROPE_ATTENTION, is_rope_attention
from llmcomp.errors import UserError
from llmcomp.prune.kv.attention import eager_attention, gather_past_mask, split_mask

ATTN_IMPL = "llmcomp_kv"
ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")  # where decoder layers keep it


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cat_masks(past: torch.Tensor | None, new: torch.Tensor, n_past: int) -> torch.Tensor:
    """Join a past-token mask (None = all allowed) and a new-token mask along the key axis."""
    if past is None:
        past = torch.ones((*new.shape[:-1], n_past), dtype=torch.bool, device=new.device)
    b = max(past.shape[0], new.shape[0])
    h = max(past.shape[1], new.shape[1])
    return torch.cat([past.expand(b, h, *past.shape[2:]), new.expand(b, h, *new.shape[2:])], dim=-1)


def leading_padding(mask: torch.Tensor | None, start: int, q_len: int) -> torch.Tensor | None:
    """int64 [B]: of the keys ``start .. start + q_len`` (a forward's own tokens), how many no query may see,
    counted from the left — a left-padded batch's padding (None: no mask). The last query sees every real key."""
    if mask is None:
        return None
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0, -1, start:start + q_len]
    return (~allowed).long().cumprod(-1).sum(-1)


def position_ids(args, kwargs) -> torch.Tensor | None:
    """The position ids the model rotated this forward's keys by, where the attention passes them on to the
    cache (transformers 5: ``update(..., kwargs={"position_ids": ...})``); None elsewhere."""
    extra = kwargs.get("kwargs") or next((a for a in args if isinstance(a, dict)), None) or {}
    ids = extra.get("position_ids") if isinstance(extra, dict) else None
    return ids if isinstance(ids, torch.Tensor) else None


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's cache under a policy. Subclasses hold the tokens in their own form and
    implement ``past`` (a dense view for the reference attention), ``append`` and ``nbytes``."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    needs_probs = False  # append() wants the attention probabilities of the new queries

    def __init__(self, layer_idx: int, runtime=None):
        super().__init__()
        self.layer_idx, self.runtime = layer_idx, runtime
        self.seen = 0
        self.lead: torch.Tensor | None = None  # int64 [B]: each row's leading padding (None: none)
        self.shift: torch.Tensor | None = None  # int64 [B]: cache index − rotary position (None: not known)
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- transformers' layer API --------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stage the new tokens; ``attend`` (called by the attention function) consumes them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._new is not None:
            raise RuntimeError(f"KV policy layer {self.layer_idx} got a second update before attention ran; "
                               f"the model's attention implementation must be {ATTN_IMPL!r}.")
        self._new = (key_states, value_states)
        ids = position_ids(args, kwargs)
        if ids is not None:  # cache index − position of the chunk's last token (real in a left-padded row)
            self.shift = (self.seen + key_states.shape[-2] - 1) - ids[:, -1].long().to(key_states.device)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self._new, self.is_initialized, self.lead, self.shift = 0, None, False, None, None
        self.clear()

    def _count_padding(self, mask, q_len: int) -> None:
        """``lead`` after this forward: rows with no real token yet (all padding so far, as a prefill in chunks
        shorter than the padding has) add this chunk's leading padding."""
        counts = leading_padding(mask, self.seen, q_len)
        if counts is None:
            return
        lead = self.lead if self.lead is not None else torch.zeros_like(counts)
        lead = torch.where(lead == self.seen, lead + counts, lead)
        self.lead = lead if bool(lead.any()) else None

    def rope_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """The positions the model rotated the keys at cache indices ``pos`` [P] by: [B, P] from the position
        ids it passed (``shift``), else counted from each row's first real token, as ``generate`` does."""
        if self.shift is not None:
            return (pos.long()[None] - self.shift[:, None]).clamp(min=0)
        return self.real_positions(pos).clamp(min=0)

    def real_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Cache indices ``pos`` [B, ...] (or [P], shared by the rows) as each row's own token positions: a
        left-padded row's first real token is its position 0, its padding negative (``lead``: the leading
        padding of each row, counted from the masks while a row has seen only padding; None = no padding)."""
        if self.lead is None:
            return pos.long()
        lead = self.lead.view(-1, *([1] * (pos.dim() - 1))) if pos.dim() > 1 else self.lead[:, None]
        return pos.long() - lead

    def _unsupported(self, *args, **kwargs):
        raise UserError("KV policy caches support greedy decoding and sampling only (no beam search, cropping "
                        "or assisted generation); load the model without its KV policy for those.")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = offload = prefetch = _unsupported

    # -- policy API -----------------------------------------------------------------------------
    def clear(self) -> None:
        raise NotImplementedError

    def past(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Dense (keys, values) [B, Hkv, P, D] of the held tokens and their positions (None = 0..seen-1)."""
        raise NotImplementedError

    def append(self, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor | None) -> None:
        """Store the new tokens (positions ``seen .. seen+Q-1``); ``probs`` [B, H, Q, P+Q] if needs_probs."""
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def dense_nbytes(self) -> int:
        """What an uncompressed cache would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        return 2 * self.batch_size * self.num_kv_heads * self.seen * self.head_dim * torch.finfo(self.dtype).bits // 8

    def attend(self, module, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query`` [B, H, Q, D] over the held tokens plus the staged ones (then stored).

        ``mask``: HF's mask over all seen tokens (None = plain causal). Returns [B, Q, H, D]."""
        if self._new is None:
            raise RuntimeError(f"KV policy layer {self.layer_idx}: attention ran without a cache update.")
        k_new, v_new = self._new
        self._new = None
        if self.seen == 0 or (self.lead is not None and bool((self.lead == self.seen).any())):
            self._count_padding(mask, query.shape[2])
        out = self.compute(module, query, k_new, v_new, mask, scaling)
        self.seen += query.shape[2]
        return out

    def held_mask(self, mask, held: int, positions, n_rep: int, q_len: int, device):
        """The mask for [held tokens | new tokens]. When the layer holds every seen token in order this
        is HF's mask itself (so a lossless policy makes exactly the dense model's attention call)."""
        if positions is None and held == self.seen:
            return mask
        past_mask, new_mask = split_mask(mask, self.seen, q_len, device)
        if held == 0:
            return new_mask
        return cat_masks(gather_past_mask(past_mask, positions, n_rep), new_mask, held)

    def compute(self, module, q, k_new, v_new, mask, scaling) -> torch.Tensor:
        """Reference path: dense view of the held tokens + the new ones through ``attention``."""
        k_past, v_past, positions = self.past()
        held = 0 if k_past is None else k_past.shape[-2]
        if held:
            k_new_all, v_new_all = torch.cat([k_past, k_new], dim=-2), torch.cat([v_past, v_new], dim=-2)
        else:
            k_new_all, v_new_all = k_new, v_new
        full = self.held_mask(mask, held, positions, q.shape[1] // k_new.shape[1], q.shape[2], q.device)
        out, probs = attention(module, q, k_new_all, v_new_all, full, scaling, self.needs_probs)
        self.append(k_new, v_new, probs)
        return out


def attention(module, q, k, v, mask, scaling, need_probs: bool = False):
    """(output [B, Q, H, D], probabilities or None). Without probabilities this is transformers' own SDPA
    function (so lossless policies reproduce the dense SDPA model exactly); with them, the eager
    reference (reproducing the dense eager model)."""
    if need_probs:
        if mask is None and q.shape[2] > 1:  # HF's "plain causal" shortcut, aligned to the last key
            t, n = k.shape[2], q.shape[2]
            mask = torch.ones(n, t, dtype=torch.bool, device=q.device).tril(t - n)
        out, probs = eager_attention(q, k, v, mask, scaling)
        return out.transpose(1, 2).contiguous(), probs
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, mask, scaling=scaling, dropout=0.0)
    return out, None


class KVCache(Cache):
    """A ``Cache`` of ``PolicyLayer``s, one per decoder layer."""

    def __init__(self, layers: list[PolicyLayer]):
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes of every tensor the layers hold (values, codes, scales, bitmaps, positions, scores)."""
        return sum(layer.nbytes() for layer in self.layers if layer.is_initialized)

    def dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes() for layer in self.layers)


# -- installing a policy on a model ----------------------------------------------------------------

def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    from llmcomp.core.model import decoder_layers

    prefix, layers = decoder_layers(model)
    mods = []
    for i, layer in enumerate(layers):
        attn = next((getattr(layer, n) for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        if attn is None:
            raise UserError(f"KV policies do not support {type(layer).__name__} ({prefix}.{i}): no attention module "
                            f"found; supported: {', '.join(ROPE_ATTENTION)}.")
        mods.append(attn)
    return mods


def check_supported(model: nn.Module) -> list[nn.Module]:
    """Every attention module must be one the cache layer supports, all layers full attention."""
    from llmcomp.core.model import decoder_layers

    prefix, layers = decoder_layers(model)
    mods = attention_modules(model)
    for i, m in enumerate(mods):
        name = type(m).__name__
        if not is_rope_attention(m):
            where = next(n for n in ATTENTION_NAMES if getattr(layers[i], n, None) is m)
            raise UserError(f"KV policies do not support {name} ({prefix}.{i}.{where}); supported: "
                            f"{', '.join(ROPE_ATTENTION)}.")
    types = getattr(model.config, "layer_types", None)
    if types is None and getattr(model.config, "sliding_window", None):
        types = ["sliding_attention"]
    other = sorted({t for t in types or [] if t != "full_attention"})
    if other:
        raise UserError(f"KV policies need full attention in every layer; this model has {', '.join(other)} layers.")
    return mods


def kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``llmcomp_kv`` attention implementation: the policy layer attends, or SDPA when no policy
    cache is active for this forward (``use_cache=False``, a user-supplied cache)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    runtime = getattr(module, "_llmcomp_kv", None)
    cache = runtime.cache if runtime is not None else None
    if cache is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    out = cache.layers[module.layer_idx].attend(module, query, attention_mask,
                                                module.scaling if scaling is None else scaling)
    return out, None


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, kv_attention)
    AttentionMaskInterface.register(ATTN_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _REGISTERED = True


class KVRuntime:
    """Per-model state of an installed policy: the policy, the attention modules, the active cache."""

    def __init__(self, model: nn.Module, policy, modules: list[nn.Module]):
        self.policy, self.modules = policy, modules
        self.use_cache_default = bool(getattr(model.config, "use_cache", True))
        self.rotary = getattr(model.base_model, "rotary_emb", None)
        self.cache_kw = cache_kwarg(model.base_model)  # the decoder's name for its cache argument
        self.cache: KVCache | None = None
        self.previous_impl = model.config._attn_implementation
        self.handle = None

    def new_cache(self) -> KVCache:
        return KVCache([self.policy.make_layer(i, self) for i in range(len(self.modules))])

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, P, D] of the model's rotary embedding at ``positions`` [P] ([B, P, D] at [B, P])."""
        if self.rotary is None:
            raise UserError("This KV policy needs the model's rotary embedding (model.rotary_emb), which it lacks.")
        return self.rotary(like, (positions if positions.dim() == 2 else positions[None]).to(like.device))

    def pre_forward(self, module, args, kwargs):
        use = kwargs.get("use_cache")
        use = self.use_cache_default if use is None else use
        cache = pop_cache(kwargs)
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if not use:
            self.cache = None
            return args, kwargs
        fresh = cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0
                                  and not getattr(cache, "_is_user_defined", False))
        if fresh:
            cache = self.new_cache()
            kwargs[self.cache_kw] = cache
            kwargs["use_cache"] = True
        self.cache = cache if isinstance(cache, KVCache) else None
        return args, kwargs


def install(model: nn.Module, policy) -> KVRuntime:
    """Make ``model`` apply ``policy`` to every cache it creates (see the module docstring)."""
    modules = check_supported(model)
    uninstall(model)
    _register()
    runtime = KVRuntime(model, policy, modules)
    for m in modules:
        m._llmcomp_kv = runtime
    model._llmcomp_kv = runtime
    model.set_attn_implementation(ATTN_IMPL)
    runtime.handle = model.base_model.register_forward_pre_hook(runtime.pre_forward, with_kwargs=True)
    return runtime


def uninstall(model: nn.Module) -> None:
    """Remove an installed policy: dense caches and the previous attention implementation again."""
    runtime = getattr(model, "_llmcomp_kv", None)
    if runtime is None:
        return
    runtime.handle.remove()
    for m in runtime.modules:
        m.__dict__.pop("_llmcomp_kv", None)
    del model._llmcomp_kv
    model.set_attn_implementation(runtime.previous_impl)


def installed_policy(model: nn.Module):
    runtime = getattr(model, "_llmcomp_kv", None)
    return None if runtime is None else runtime.policy
