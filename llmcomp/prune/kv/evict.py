"""Token eviction: StreamingLLM (sinks + recent window), H2O (accumulated attention) and A2SF
(accumulated attention with a forgetting factor).

After each forward, a layer holding more than its budget keeps, per KV head:
- StreamingLLM: the first ``sinks`` tokens of each row (left padding is not a sink) and the most
  recent ones;
- H2O / A2SF: the most recent ``recent · budget`` tokens plus the highest-scoring others, where a
  token's score is the attention it received, summed over the query heads of its KV head and over
  queries. A2SF multiplies the running score by ``forget`` at every new query (so a query ``j`` steps
  in the past counts ``forget**j``), making old and new tokens comparable; H2O is ``forget = 1``.
Budgets: ``budget`` tokens (fixed cache size) or, with ``budget = 0``, ``1 - ratio`` of the tokens seen.
Evicted tokens keep their original positions (RoPE is not re-applied), which is what H2O does;
contexts stay within the model's trained length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcomp.core.config import register_config
from llmcomp.errors import UserError
from llmcomp.prune.kv.base import KV_METHODS, KVPolicy, check_ratio, check_tokens, keep_count
from llmcomp.prune.kv.cache import PolicyLayer, tensor_bytes

PROTECT = 1e9  # H2O / A2SF: priority bonus of the recent window (all of it is kept)


class EvictionLayer(PolicyLayer):
    """Holds kept tokens densely: keys/values [B, Hkv, P, D], positions int32 [B, Hkv, P] and, when
    scored, float32 scores [B, Hkv, P]."""

    def __init__(self, layer_idx, runtime, *, ratio: float, budget: int, sinks: int = 0, recent: float = 0.0,
                 forget: float | None = None):
        super().__init__(layer_idx, runtime)
        self.ratio, self.budget, self.sinks, self.recent, self.forget = ratio, budget, sinks, recent, forget
        self.needs_probs = forget is not None
        self.clear()

    def clear(self):
        self.k = self.v = self.pos = self.score = None
        self.fillers = False  # some row holds dead filler slots (``_evict``): positions always count

    def past(self):
        if self.k is not None and self.k.shape[-2] == self.seen and not self.fillers:  # nothing evicted yet
            return self.k, self.v, None
        return self.k, self.v, self.pos

    def nbytes(self) -> int:
        return tensor_bytes(self.k, self.v, self.pos, self.score)

    def append(self, k, v, probs):
        b, hkv, q, _ = k.shape
        new_pos = torch.arange(self.seen, self.seen + q, device=k.device, dtype=torch.int32).expand(b, hkv, q)
        if self.needs_probs:
            # [B, H, Q, P+Q] → per-KV-head score of every key, query i weighted forget**(Q-1-i)
            w = self.forget ** torch.arange(q - 1, -1, -1, device=k.device, dtype=torch.float32)
            contrib = (probs.float() * w[:, None]).sum(-2)
            contrib = contrib.view(b, hkv, -1, contrib.shape[-1]).sum(2)  # [B, Hkv, P+Q]
            p = 0 if self.k is None else self.k.shape[-2]
            old = contrib[..., :p] if self.score is None else self.score * self.forget ** q + contrib[..., :p]
            self.score = torch.cat([old, contrib[..., p:]], dim=-1)
        if self.k is None:
            self.k, self.v, self.pos = k, v, new_pos
        else:
            self.k = torch.cat([self.k, k], dim=-2)
            self.v = torch.cat([self.v, v], dim=-2)
            self.pos = torch.cat([self.pos, new_pos], dim=-1)
        self._evict(self.seen + q)

    def _keep(self, total: int) -> torch.Tensor:
        """Tokens each row keeps [B]: the budget, or ``1 − ratio`` of the row's own tokens — a left-padded row's
        padding does not count (sharing one count, a padded row kept more of its real tokens than alone)."""
        b = self.k.shape[0]
        if self.budget or self.lead is None:
            real = torch.full((b,), total, dtype=torch.long)
        else:
            real = (total - self.lead.long().cpu()).clamp(min=1)
        keep = torch.tensor([keep_count(self.ratio, self.budget, int(r)) for r in real.tolist()])
        if not self.needs_probs:  # StreamingLLM: never fewer than its sinks and the newest token
            keep = torch.maximum(keep, real.clamp(max=self.sinks + 1))
        return keep

    def _evict(self, total: int) -> None:
        keep = self._keep(total)  # on the CPU: the decisions below take no device sync
        held, K, least = self.k.shape[-2], int(keep.max()), int(keep.min())
        if held <= least:
            return
        K = min(K, held)
        uneven = least < K  # rows keeping fewer than K (more padding) hold dead fillers
        if self.needs_probs:
            n_recent = (self.recent * keep.double()).round().long()  # per row
            recent = (n_recent.to(self.pos.device).view(-1, 1, 1) if uneven else int(n_recent[0]))
            prio = self.score + (self.pos >= total - recent) * PROTECT
        else:  # StreamingLLM: each row's first real tokens (its sinks), then the most recent; padding last
            real = self.real_positions(self.pos)
            prio = self.pos.long() + ((real >= 0) & (real < self.sinks)) * (1 << 40) - (real < 0) * (1 << 41)
        top = prio.topk(K, dim=-1).indices  # [B, Hkv, K], best first
        idx, order = top.sort(dim=-1)  # position order
        full = idx[..., None].expand(*idx.shape, self.k.shape[-1])
        self.k, self.v = self.k.gather(2, full), self.v.gather(2, full)
        self.pos = self.pos.gather(2, idx)
        if self.score is not None:
            self.score = self.score.gather(2, idx)
        if uneven:
            # a row keeping fewer than K: its slots past its own count stay as dead fillers, at cache index 0 (its
            # padding: a row keeps fewer only for having more of it), so the attention mask hides them
            rank = torch.arange(K, device=top.device)
            dead = (rank >= keep.to(top.device).view(-1, 1, 1)).expand_as(top).gather(-1, order)
            self.fillers = True
            self.pos = torch.where(dead, torch.zeros_like(self.pos[..., :1]), self.pos)
            if self.score is not None:
                self.score = torch.where(dead, torch.zeros_like(self.score[..., :1]), self.score)


def _check_recent(recent: float) -> None:
    if not 0 <= recent <= 1:
        raise UserError(f"recent (the budget fraction kept for the most recent tokens) must be in [0, 1], got {recent!r}.")


@dataclass(frozen=True)
class _EvictionConfig(KVPolicy):
    def _check_budget(self):
        check_ratio("ratio", self.ratio)
        check_tokens("budget", self.budget)

    def windows(self):
        return {"budget": self.budget} if self.budget else {}

    def describe(self) -> str:
        return f"{self.method} " + (f"{self.budget} tokens" if self.budget else f"ratio {self.ratio:g}")


@KV_METHODS.register("streaming")
@register_config
@dataclass(frozen=True)
class StreamingConfig(_EvictionConfig):
    """StreamingLLM: keep ``sinks`` first tokens and the most recent ones within the budget."""

    ratio: float = 0.5
    budget: int = 0
    sinks: int = 4

    method = "streaming"
    VERSION = 1

    def __post_init__(self):
        self._check_budget()
        check_tokens("sinks", self.sinks)

    def validate_for(self, model_config, context=None):
        """(Here, not at construction: an artifact written with such a budget still loads — its cache keeps the
        sinks and the newest token.)"""
        super().validate_for(model_config, context)
        if self.budget and self.budget <= self.sinks:
            raise UserError(f"streaming budget ({self.budget} tokens) must exceed its sinks ({self.sinks}): the "
                            "recent window would be empty.")

    def windows(self):
        return {**super().windows(), "sinks": self.sinks}

    def make_layer(self, layer_idx, runtime):
        return EvictionLayer(layer_idx, runtime, ratio=self.ratio, budget=self.budget, sinks=self.sinks)


@KV_METHODS.register("h2o")
@register_config
@dataclass(frozen=True)
class H2OConfig(_EvictionConfig):
    """H2O: keep the most recent ``recent`` fraction of the budget plus the heavy hitters."""

    ratio: float = 0.5
    budget: int = 0
    recent: float = 0.5

    method = "h2o"
    VERSION = 1

    def __post_init__(self):
        self._check_budget()
        _check_recent(self.recent)

    def make_layer(self, layer_idx, runtime):
        return EvictionLayer(layer_idx, runtime, ratio=self.ratio, budget=self.budget, recent=self.recent, forget=1.0)


@KV_METHODS.register("a2sf")
@register_config
@dataclass(frozen=True)
class A2SFConfig(_EvictionConfig):
    """A2SF: H2O with the running score multiplied by ``forget`` at every new query."""

    ratio: float = 0.5
    budget: int = 0
    recent: float = 0.5
    forget: float = 0.99

    method = "a2sf"
    VERSION = 1

    def __post_init__(self):
        self._check_budget()
        _check_recent(self.recent)
        if not 0 < self.forget <= 1:
            raise UserError(f"forget (the forgetting factor) must be in (0, 1], got {self.forget!r}.")

    def make_layer(self, layer_idx, runtime):
        return EvictionLayer(layer_idx, runtime, ratio=self.ratio, budget=self.budget, recent=self.recent,
                             forget=self.forget)

    def describe(self) -> str:
        return f"{super().describe()}, forget {self.forget:g}"
