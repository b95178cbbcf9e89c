"""MC-MoE (Mixture Compressor for MoE LLMs) pieces: expert importance for mixed-precision bit allocation,
and online dynamic skipping of low-weight expert choices.

- ``expert_importance``: per expert linear, the mean over tokens of its expert's squared routing weight
  (frequency and routing weight in one number). ``llmcomp quantize --bits 2.5`` on an MoE multiplies each
  expert linear's measured error by it before the allocation (quant/allocate.py) picks bit widths, so
  rarely and weakly routed experts get fewer bits.
- ``skip_threshold``: τ on w_j / w_1 (a token's later expert choices relative to its first) such that a
  given share of all routed (token, expert) slots falls below it on the calibration text; recorded in
  the manifest and installed at load by ``moe.install_skip``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core import memory
from llmcomp.core.calib import calibrate_layerwise
from llmcomp.core.config import register_config
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError
from llmcomp.prune import moe


@register_config
@dataclass(frozen=True)
class DynamicSkipConfig:
    """MC-MoE online dynamic pruning: skip ``rate`` of the routed (token, expert) slots at run time —
    a token's later choices whose routing weight is below τ × its first choice's (τ from calibration)."""

    rate: float = 0.15

    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.rate, (int, float)) or not 0 < self.rate < 1:
            raise UserError(f"--rate must be a fraction strictly between 0 and 1, got {self.rate!r}.")


class _RoutingMass:
    """Forward hook on an MoE block: Σ over tokens of each expert's squared routing weight."""

    def __init__(self, b: moe.MoEBlock):
        self.b, self.mass, self.tokens = b, torch.zeros(b.num_experts, dtype=torch.float64), 0

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        w, idx = self.b.route(x)
        self.mass.index_add_(0, idx.flatten().cpu(), w.flatten().double().cpu().pow(2))
        self.tokens += x.shape[0]


def expert_importance(model: nn.Module, calib_ids: torch.Tensor, device=None, progress: Progress = NULL,
                      batch_size: int = 8) -> dict[str, float]:
    """MC-MoE-style importance of every expert linear (``{linear path: weight}``): the mean over tokens of
    its expert's squared routing weight — the factor by which that linear's per-token output error
    reaches the block output (frequency and routing weight in one number). Experts must be unfused."""
    blocks = {b.path: b for b in moe.find_moe_blocks(model, strict=False) if b.unfused}
    out: dict[str, float] = {}

    def handler(path, layer, runner):
        hooks = {b.block: _RoutingMass(b) for p, b in blocks.items() if p.startswith(path + ".")}
        if not hooks:
            return
        runner.run(hooks)
        for h in hooks.values():
            for e, m in enumerate((h.mass / max(h.tokens, 1)).tolist()):
                out[f"{h.b.path}.experts.gate_up.{e}"] = out[f"{h.b.path}.experts.down.{e}"] = m

    if blocks:
        calibrate_layerwise(model, calib_ids, handler, batch_size=batch_size, device=device, progress=progress,
                            remedy=memory.QUANTIZE_REMEDY)  # (quantize's MC-MoE weighting)
    return out


class _WeightRatios:
    """Forward hook on an MoE block: w_j / w_1 of every chosen expert after the first (sampled)."""

    def __init__(self, b: moe.MoEBlock):
        self.b, self.ratios = b, []

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        w, _ = self.b.route(inputs[0].reshape(-1, inputs[0].shape[-1]))
        w = w.float().sort(dim=-1, descending=True).values
        self.ratios.append((w[:, 1:] / w[:, :1].clamp(min=1e-30)).flatten().cpu())


def skip_threshold(model: nn.Module, calib_ids: torch.Tensor, rate: float, device=None,
                   progress: Progress = NULL) -> tuple[float, dict]:
    """The threshold τ on w_j / w_1 that skips ``rate`` of all routed (token, expert) slots on the
    calibration text (MC-MoE dynamic pruning; the first choice of a token is never skipped)."""
    blocks = {b.path: b for b in moe.require_moe(model)}
    top_k = {b.top_k for b in blocks.values()}
    k = min(top_k)
    if k < 2:
        raise UserError("Dynamic skipping needs top_k ≥ 2 (a token's first expert is never skipped).")
    if not 0 < rate < (k - 1) / k:
        raise UserError(f"--rate must be between 0 and {(k - 1) / k:g} (all but each token's first expert), got {rate:g}.")
    ratios: list[torch.Tensor] = []

    def handler(path, layer, runner):
        hooks = {b.block: _WeightRatios(b) for p, b in blocks.items() if p.startswith(path + ".")}
        if hooks:
            runner.run(hooks)
            ratios.extend(r for h in hooks.values() for r in h.ratios)

    calibrate_layerwise(model, calib_ids, handler, device=device, progress=progress)
    every = torch.cat(ratios).double()
    q = rate * k / (k - 1)  # the slots after the first are (k − 1)/k of all
    tau = float(torch.quantile(every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(0))[:1 << 24]], q))
    skipped = float((every < tau).double().mean()) * (k - 1) / k
    return tau, {"threshold": tau, "skipped_slots_calibration": round(skipped, 5), "top_k": k}
