"""The KV-policy contract: a frozen config per method, registered by name, that builds cache layers.

A policy config (``MustafarConfig``, ``KIVIConfig``, ``H2OConfig`` ...) is what the artifact stores
(manifest stage ``policy``). ``make_layer`` builds one cache layer per decoder layer when a cache
is created; ``calibrate`` (methods with ``needs_calibration``) returns the config with its calibrated
parameters filled in, plus a report (DuoAttention's head mask) and may add modules to the model (CSKV's bases);
``build_skeleton`` re-creates those modules on the meta skeleton when an artifact is loaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from llmcomp.core.registry import Registry
from llmcomp.errors import UserError

KV_METHODS: Registry[type] = Registry("KV method")


def check_ratio(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise UserError(f"{name} must be in [0, 1), got {value!r}.")


def check_tokens(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")


def context_length(model_config) -> int:
    return int(getattr(model_config, "max_position_embeddings", 0) or 0)


def head_dim(model_config) -> int:
    return getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads


def kv_heads(model_config) -> int:
    return getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads


@dataclass(frozen=True)
class KVPolicy:
    """Base of every KV policy config."""

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def windows(self) -> dict[str, int]:
        """Token counts that must fit in the context (name → tokens), checked by ``validate_for``."""
        return {}

    def calibration_lengths(self) -> dict[str, int]:
        """Sequence lengths calibration runs at (name → tokens), checked against the model at prune time."""
        return {}

    def validate_for(self, model_config, context: int | None = None) -> None:
        """Raise UserError when a window or budget does not fit the given context (an evaluation's) or,
        with none given, the model's context (then calibration lengths are checked too)."""
        limit = context or context_length(model_config)
        checks = {**self.windows(), **({} if context else self.calibration_lengths())}
        for name, tokens in checks.items():
            if limit and tokens >= limit:  # (at an evaluation the policy is fixed and the evaluation can change)
                raise UserError(f"{self.method}: the policy's {name} of {tokens} tokens is not smaller than the "
                                f"evaluation's context ({limit} tokens); evaluate at more than {tokens} tokens "
                                "(--context, --passkey-lengths)." if context else
                                f"{self.method}: {name} of {tokens} tokens is not smaller than the context "
                                f"({limit} tokens); choose a smaller {name}.")

    def check_model(self, model) -> None:
        """Raise UserError where the policy's own settings do not fit ``model`` (a stored head split, say)."""

    def make_layer(self, layer_idx: int, runtime):
        raise NotImplementedError

    def calibrate(self, model, tokenizer, progress, device) -> tuple["KVPolicy", dict]:
        """Calibrated copy of the policy (and a small report for the manifest)."""
        return self, {}

    def build_skeleton(self, model) -> None:
        """Add the modules ``calibrate`` added (on the meta device) before an artifact's tensors load."""

    def describe(self) -> str:
        return self.method


def keep_count(ratio: float, budget: int, seen: int) -> int:
    """Tokens an evicting cache keeps after seeing ``seen``: ``budget`` if > 0, else ``(1 - ratio)``
    of them (rounded up, at least 1)."""
    if budget > 0:
        return min(budget, seen)
    return max(1, min(seen, math.ceil((1 - ratio) * seen - 1e-9)))
