"""Artifact hook: a manifest stage of kind ``linearize`` puts the student attention modules back into
``llmcomp.load``'s meta skeleton (before tensors load), one per layer the stage's ``layout`` marks linear.

Registered with ``core.artifact`` on import (``llmcomp.api`` imports this module).
"""
from __future__ import annotations

from llmcomp.core.artifact import register_stage_hook
from llmcomp.core.config import from_dict

KIND = "linearize"


class _LinearizeStageHook:
    def skeleton(self, model, stage: dict) -> None:
        from llmcomp.core.model import decoder_layers
        from llmcomp.linearize.student import LinearAttention, attention_of, install

        spec = from_dict(stage["student"])
        _, layers = decoder_layers(model)
        install(model, {i: LinearAttention(attention_of(layers[i]), spec)
                        for i, kind in enumerate(stage["layout"]) if kind == "linear"})

    def ready(self, model, stage: dict) -> None:
        pass


register_stage_hook(KIND, _LinearizeStageHook())
