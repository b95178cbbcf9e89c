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

        from llmcomp.linearize.student import StudentSpec

        spec = from_dict(stage["student"])
        _, layers = decoder_layers(model)
        layout = stage["layout"]
        if not isinstance(spec, StudentSpec):
            raise ValueError(f"its student is {stage['student']!r}, not a student spec")
        if not isinstance(layout, list) or len(layout) != len(layers) or set(layout) - {"linear", "softmax"}:
            raise ValueError(f"its layout must name 'linear' or 'softmax' for each of the {len(layers)} layers")
        install(model, {i: LinearAttention(attention_of(layers[i]), spec)
                        for i, kind in enumerate(layout) if kind == "linear"})

    def ready(self, model, stage: dict) -> None:
        pass


register_stage_hook(KIND, _LinearizeStageHook())
