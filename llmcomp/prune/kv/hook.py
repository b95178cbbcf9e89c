"""Artifact hook for KV policies: a manifest stage of kind ``kv`` re-installs its policy at load.

Registered with ``core.artifact`` on import (``llmcomp.api`` imports this module). Kept light: the
policy modules (and transformers' cache classes) are imported only when an artifact has a KV stage.
"""
from __future__ import annotations

from llmcomp.core.artifact import register_stage_hook
from llmcomp.core.config import from_dict

KIND = "kv"


def policy_of(stage: dict):
    from llmcomp.prune.kv import load_policies

    load_policies()  # registers the policy config classes
    return from_dict(stage["config"])


class _KVStageHook:
    def skeleton(self, model, stage: dict) -> None:
        """Before tensors load: add the modules the policy stores (CSKV bases) to the meta skeleton."""
        policy_of(stage).build_skeleton(model)

    def ready(self, model, stage: dict) -> None:
        """After tensors load: make every cached forward / generate apply the policy."""
        from llmcomp.prune.kv.cache import install

        policy = policy_of(stage)
        policy.check_model(model)  # (a stored head split of another model failed at the first generate)
        install(model, policy)


register_stage_hook(KIND, _KVStageHook())
