"""Expert pruning for MoE models: every score from one calibration pass, a super-expert guard, a plan.

One pass of the shared layer-wise driver (core/calib.py) over the original model records, per MoE block:

- ``frequency``: how many tokens the router sends to each expert;
- ``reap``: REAP saliency, the mean over the tokens routed to an expert of gate weight × ‖expert output‖;
- ``reconstruct``: NAEE-style greedy removal — on a token sample, repeatedly drop the expert whose
  removal (tokens re-routed among the rest by the block's own router) changes the block output least;
- ``heapr``: atomic experts (single neurons, one gate/up row + one down column) scored with the
  Hessian of the block output error w.r.t. their output scales, G = (CᵀC) ⊙ (DᵀD) per expert
  (C: routing weight × activation per routed token, D: down columns); OBS removes the cheapest atomic
  expert of the whole layer, updates the others' scales (folded into down_proj) and repeats;
- the largest |down_proj output| of each expert, for the super-expert guard (Su et al.): an expert
  whose maximum is above the 99.5th percentile of all experts' maxima, above a tenth of the largest
  *and* above ten times the median one is a super expert and is never removed (without the last test
  the largest maximum always passed: a model with no outlier had its top expert protected).
Expert-level methods turn scores into a removal order per block; ``random`` is a seeded shuffle.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from llmcomp.core.calib import calibrate_layerwise
from llmcomp.core.config import register_config
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError
from llmcomp.prune import moe
from llmcomp.report.facts import BITS_BEFORE_EXPERT_PRUNING
from llmcomp.quant.hessian import dampen

METHODS = ("random", "frequency", "reap", "reconstruct", "heapr")


@register_config
@dataclass(frozen=True)
class ExpertPruneConfig:
    """Remove ``ratio`` of each MoE block's routed experts (``heapr``: of its neurons) by ``method``.

    ``layer_ratios`` overrides the ratio per decoder layer index (``{"3": 0.5}``), which makes counts
    differ between blocks (recorded in the manifest; llmcomp.load rebuilds them)."""

    method: str = "reap"
    ratio: float = 0.25
    protect_super_experts: bool = True
    layer_ratios: dict = field(default_factory=dict)
    seed: int = 0
    recon_tokens: int = 2048
    damp: float = 0.01
    compensate: bool = True
    se_quantile: float = 0.995
    se_fraction: float = 0.1
    se_median_factor: float = 10.0

    VERSION = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"Unknown expert pruning method {self.method!r}; choose one of: {', '.join(METHODS)}.")
        for where, r in [("--ratio", self.ratio)] + [(f"--layer-ratio {k}={v}: a ratio", v)
                                                    for k, v in self.layer_ratios.items()]:
            if not isinstance(r, (int, float)) or not 0 < r < 1:
                raise UserError(f"{where} must be a fraction strictly between 0 and 1, got {r!r}.")
        for k in self.layer_ratios:
            if not str(k).isdigit():
                raise UserError(f"Layer ratios are keyed by decoder layer index, got {k!r}.")
        if self.recon_tokens < 16 or self.damp < 0 or not 0 < self.se_quantile < 1 or not 0 < self.se_fraction <= 1:
            raise UserError("recon_tokens must be ≥ 16, damp ≥ 0, se_quantile and se_fraction in (0, 1).")
        if not self.se_median_factor >= 1:
            raise UserError(f"se_median_factor must be ≥ 1, got {self.se_median_factor!r}.")

    def ratio_for(self, layer: int) -> float:
        return float({int(k): v for k, v in self.layer_ratios.items()}.get(layer, self.ratio))

    def check_layers(self, blocks) -> None:
        """Every per-layer ratio must name a layer with an MoE block (one that names none did nothing)."""
        moe_layers = sorted(b.layer for b in blocks)
        for k in self.layer_ratios:
            if int(k) not in moe_layers:
                raise UserError(f"A layer ratio names layer {k}, which has no MoE block; MoE blocks are in layers "
                                f"{', '.join(map(str, moe_layers))}.")


@dataclass
class BlockStats:
    """What one calibration pass learned about one MoE block (all on CPU)."""

    path: str
    layer: int
    num_experts: int
    top_k: int
    tokens: int = 0
    counts: torch.Tensor = None  # [E] router selections
    reap_sum: torch.Tensor = None  # [E] Σ over routed tokens of weight · ‖output‖
    max_out: torch.Tensor = None  # [E] largest |down_proj output| (before the routing weight)
    gram: list = None  # per expert [I_e, I_e]: Σ over routed tokens of c cᵀ, c = weight · activation
    recon_order: list = None  # greedy removal order (NAEE-style); the last top_k are never removed
    recon_error: list = None  # block output error (relative) after each greedy removal

    def reap(self) -> torch.Tensor:
        return self.reap_sum / self.counts.clamp(min=1)


# ---- the calibration pass ---------------------------------------------------------------------------------

def _route_subset(b: moe.MoEBlock, x: torch.Tensor, keep: list[int]):
    """The block's router restricted to experts ``keep`` (exactly what surgery would leave)."""
    router = copy.deepcopy(b.router)
    moe._slice_first_dim(router, b.num_experts, torch.tensor(keep))
    moe._set_count(router, b.num_experts, len(keep))
    _, w, idx = router(x)
    return w, idx


@torch.no_grad()
def greedy_removal(b: moe.MoEBlock, x: torch.Tensor) -> tuple[list[int], list[float]]:
    """NAEE-style: remove experts one at a time, each time the one whose removal (with re-routing)
    keeps the block output on ``x`` [T, H] closest to the full block's. Returns (order, errors)."""
    E, k = b.num_experts, b.top_k
    outs = torch.stack([nn.functional.linear(b.act(x, e), b.weights(e)[2]) for e in range(E)])  # (E, T, H)
    tok = torch.arange(x.shape[0], device=x.device)

    def block_out(keep):
        w, idx = _route_subset(b, x, keep)
        sub = outs[keep]
        return sum(w[:, j, None].to(sub.dtype) * sub[idx[:, j], tok] for j in range(idx.shape[1]))

    full = block_out(list(range(E)))
    norm = float(full.pow(2).sum().clamp(min=1e-30))
    removed, errors = [], []
    while E - len(removed) > k:
        best, best_err = None, None
        for c in range(E):
            if c in removed:
                continue
            err = float((block_out([e for e in range(E) if e not in removed and e != c]) - full).pow(2).sum())
            if best_err is None or err < best_err:
                best, best_err = c, err
        removed.append(best)
        errors.append(best_err / norm)
    return removed + [e for e in range(E) if e not in removed], errors


class _BlockObserver:
    """Forward hook on one MoE block: accumulates its BlockStats over every calibration batch."""

    def __init__(self, b: moe.MoEBlock, sample_per_batch: int):
        E = b.num_experts
        self.b, self.sample_per_batch = b, sample_per_batch
        self.stats = BlockStats(b.path, b.layer, E, b.top_k, counts=torch.zeros(E, dtype=torch.long),
                                reap_sum=torch.zeros(E, dtype=torch.float64), max_out=torch.zeros(E),
                                gram=[torch.zeros(s, s, dtype=torch.float64) for s in b.sizes])
        self.sample: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, module, inputs, output):
        b, st = self.b, self.stats
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        st.tokens += x.shape[0]
        step = max(1, x.shape[0] // self.sample_per_batch)
        self.sample.append(x[::step][: self.sample_per_batch])
        w, idx = b.route(x)
        for e in idx.unique().tolist():
            token, pos = torch.where(idx == e)
            h = b.act(x[token], e)  # (n, I)
            gate_w = w[token, pos].to(h.dtype)
            out = nn.functional.linear(h, b.weights(e)[2])  # (n, H)
            st.counts[e] += token.numel()
            st.reap_sum[e] += float((gate_w * out.float().norm(dim=-1)).sum())
            st.max_out[e] = max(float(st.max_out[e]), float(out.abs().max()))
            c = (h * gate_w[:, None]).double().cpu()
            st.gram[e].addmm_(c.T, c)

    def finish(self) -> BlockStats:
        x = torch.cat(self.sample)
        self.stats.recon_order, self.stats.recon_error = greedy_removal(self.b, x)
        self.sample.clear()
        return self.stats


def collect_stats(model: nn.Module, calib_ids: torch.Tensor, cfg: ExpertPruneConfig, device=None,
                  progress: Progress = NULL) -> dict[str, BlockStats]:
    """One calibration pass over ``model`` (unchanged): ``{block path: BlockStats}``."""
    blocks = {b.path: b for b in moe.require_moe(model)}
    cfg.check_layers(blocks.values())
    found: dict[str, BlockStats] = {}

    def handler(path, layer, runner):
        mine = [b for p, b in blocks.items() if p.startswith(path + ".")]
        if not mine:
            return
        per_batch = max(1, -(-cfg.recon_tokens // max(1, len(runner.inputs))))
        observers = {b.block: _BlockObserver(b, per_batch) for b in mine}
        runner.run(observers)
        for obs in observers.values():
            found[obs.b.path] = obs.finish()

    calibrate_layerwise(model, calib_ids, handler, device=device, progress=progress)
    return found


def super_experts(stats: dict[str, BlockStats], quantile: float = 0.995, fraction: float = 0.1,
                  median_factor: float = 10.0) -> dict[str, list[int]]:
    """Experts whose largest down_proj output is extreme model-wide (Super Experts criterion), and an outlier:
    above ``median_factor`` × the median expert's (the percentile and the fraction of the largest always let the
    largest through, outlier or not)."""
    every = torch.cat([s.max_out for s in stats.values()])
    if every.numel() == 0:
        return {}
    every = every.double()
    threshold = max(float(torch.quantile(every, quantile)), fraction * float(every.max()),
                    median_factor * float(every.median()))
    return {p: [e for e in range(s.num_experts) if float(s.max_out[e]) > threshold] for p, s in stats.items()
            if any(float(v) > threshold for v in s.max_out)}


# ---- from scores to a plan ------------------------------------------------------------------------------

def removal_order(method: str, st: BlockStats, seed: int) -> list[int]:
    """Experts of one block, least important first."""
    if method == "random":
        gen = torch.Generator().manual_seed((seed * 100003 + st.layer) % (1 << 64))  # (torch takes [0, 2⁶⁴))
        return torch.randperm(st.num_experts, generator=gen).tolist()
    if method == "frequency":
        return torch.argsort(st.counts.double() + 1e-9 * st.reap(), stable=True).tolist()
    if method == "reap":
        return torch.argsort(st.reap(), stable=True).tolist()
    if method == "reconstruct":
        return list(st.recon_order)
    raise ValueError(method)


def _count(ratio: float, n: int) -> int:
    return int(ratio * n + 0.5)


def removal_count(cfg: ExpertPruneConfig, path: str, layer: int, num_experts: int, top_k: int,
                  sizes: list[int]) -> int:
    """The experts (HEAPr: neurons, of ``sizes``) ``cfg`` removes from one block. A ratio that removes none, or
    leaves fewer experts than the router picks, is a UserError — decided by the block's shape alone, so
    ``check_ratios`` raises it before the calibration pass."""
    ratio = cfg.ratio_for(layer)
    if cfg.method == "heapr":
        n = _count(ratio, sum(sizes))
        if n == 0:
            raise UserError(f"Ratio {ratio:g} removes no neuron of the {sum(sizes)} in {path}; raise it.")
        return n
    n = _count(ratio, num_experts)
    if n == 0:
        raise UserError(f"Ratio {ratio:g} removes no expert of the {num_experts} in {path}; raise it.")
    if num_experts - n < top_k:
        raise UserError(f"Ratio {ratio:g} removes {n} of the {num_experts} experts in {path}, "
                        f"leaving fewer than top_k = {top_k}; lower the ratio.")
    return n


def check_ratios(blocks: list[moe.MoEBlock], cfg: ExpertPruneConfig) -> None:
    for b in blocks:
        removal_count(cfg, b.path, b.layer, b.num_experts, b.top_k, b.sizes)


def plan_experts(stats: dict[str, BlockStats], cfg: ExpertPruneConfig, protected: dict[str, list[int]]
                 ) -> dict[str, dict]:
    """``{path: {"keep": [...], "removed": [...], "skipped_protected": [...]}}`` for expert-level methods."""
    plan = {}
    for path, st in stats.items():
        E = st.num_experts
        n = removal_count(cfg, path, st.layer, E, st.top_k, [])
        guard = set(protected.get(path, []))
        if n > E - len(guard):
            raise UserError(f"{path}: ratio {cfg.ratio_for(st.layer):g} asks for {n} of the {E} experts but only "
                            f"{E - len(guard)} are not protected super experts; lower the ratio or pass "
                            "--no-protect-super-experts.")
        order = removal_order(cfg.method, st, cfg.seed)
        removed = [e for e in order if e not in guard][:n]
        plan[path] = {"keep": sorted(set(range(E)) - set(removed)), "removed": sorted(removed),
                      "skipped_protected": sorted(e for e in order[: order.index(removed[-1]) + 1] if e in guard)
                      if removed else []}
    return plan


def output_hessian(st: BlockStats, b: moe.MoEBlock, e: int) -> torch.Tensor:
    """G = (CᵀC) ⊙ (DᵀD) for expert ``e``: the Hessian (÷2) of Σ_t ‖Δ block output‖² w.r.t. the
    output scales of its atomic experts (mean over all calibration tokens of the block)."""
    D = b.weights(e)[2].detach().double().cpu()
    return st.gram[e] * (D.T @ D) / max(st.tokens, 1)


def plan_atomic(stats: dict[str, BlockStats], blocks: dict[str, moe.MoEBlock], cfg: ExpertPruneConfig,
                protected: dict[str, list[int]]) -> dict[str, dict]:
    """HEAPr: per layer remove ``ratio`` of all atomic experts, cheapest first, by OBS in output space.

    ``{path: {"keep": [neuron indices per expert], "scales": [...], "removed_per_expert": [...],
    "error": relative block-output error estimate}}``."""
    plan = {}
    for path, st in stats.items():
        b, guard = blocks[path], set(protected.get(path, []))
        sizes = b.sizes
        n = removal_count(cfg, path, st.layer, len(sizes), 0, sizes)
        G = [output_hessian(st, b, e) for e in range(len(sizes))]
        Hinv = [torch.cholesky_inverse(torch.linalg.cholesky(dampen(g, cfg.damp).H.double())) if g.numel() else g
                for g in G]
        scale = [torch.ones(s, dtype=torch.float64) for s in sizes]
        alive = [torch.ones(s, dtype=torch.bool) for s in sizes]
        inf = torch.tensor(float("inf"), dtype=torch.float64)

        dead = [g.diagonal() == 0 for g in G]  # neurons no calibration token reaches (or a zero down column)

        def costs(e):
            if e in guard or not alive[e].any():
                return torch.full((sizes[e],), float("inf"), dtype=torch.float64)
            if cfg.compensate:  # (a dead neuron's dampened diagonal would give it a cost; it has none)
                c = torch.where(dead[e], 0.0, scale[e] ** 2 / Hinv[e].diagonal().clamp(min=1e-300))
            else:
                c = G[e].diagonal().clone()
            return torch.where(alive[e], c, inf)

        cost = [costs(e) for e in range(len(sizes))]
        budget = sum(int(alive[e].sum()) for e in range(len(sizes)) if e not in guard)
        if n > budget:
            raise UserError(f"{path}: ratio {cfg.ratio_for(st.layer):g} asks for {n} neurons but only {budget} "
                            "are not in protected super experts; lower the ratio or pass --no-protect-super-experts.")
        total = 0.0
        for _ in range(n):
            best = min(range(len(sizes)), key=lambda e: float(cost[e].min()) if cost[e].numel() else float("inf"))
            i = int(cost[best].argmin())
            total += float(cost[best][i])
            if cfg.compensate:
                Hi = Hinv[best]
                col = Hi[:, i].clone()
                scale[best] -= scale[best][i] / col[i] * col
                Hinv[best] = Hi - torch.outer(col, Hi[i]) / col[i]
            alive[best][i] = False
            scale[best][i] = 0.0
            cost[best] = costs(best)
        signal = sum(float(G[e].sum()) for e in range(len(sizes)))
        plan[path] = {"keep": [torch.nonzero(a).flatten() for a in alive],
                      "scales": [scale[e][alive[e]].float() for e in range(len(sizes))] if cfg.compensate else None,
                      "removed_per_expert": [int((~a).sum()) for a in alive],
                      "error": total / signal if signal > 0 else 0.0}
    return plan


def prune(model: nn.Module, stats: dict[str, BlockStats], cfg: ExpertPruneConfig) -> dict:
    """Apply ``cfg`` to ``model`` in place using ``stats`` from ``collect_stats``; returns the report."""
    blocks = {b.path: b for b in moe.require_moe(model)}
    before = expert_params(model)
    found = super_experts(stats, cfg.se_quantile, cfg.se_fraction, cfg.se_median_factor)
    protected = found if cfg.protect_super_experts else {}
    report: dict = {"super_experts": found, "protected": bool(cfg.protect_super_experts), "layers": {}}
    if cfg.method == "heapr":
        plan = plan_atomic(stats, blocks, cfg, protected)
        for path, p in plan.items():
            moe.keep_neurons(blocks[path], p["keep"], p["scales"])
            report["layers"][path] = {"removed_per_expert": p["removed_per_expert"], "est_error": round(p["error"], 6)}
    else:
        plan = plan_experts(stats, cfg, protected)
        for path, p in plan.items():
            moe.keep_experts(blocks[path], p["keep"])
            st = stats[path]
            report["layers"][path] = {"removed": p["removed"], "skipped_protected": p["skipped_protected"],
                                      "frequency": st.counts.tolist(),
                                      "reap": [round(float(v), 5) for v in st.reap()]}
    report["stock_loadable"] = moe.sync_config(model)
    after = expert_params(model)
    report["expert_params"] = {"before": before, "after": after, "removed_fraction": round(1 - after / before, 5)}
    return report


def expert_params(model: nn.Module) -> int:
    """Parameters in the routers and routed experts of every MoE block."""
    total = 0
    for b in moe.find_moe_blocks(model):
        total += sum(p.numel() for p in b.router.parameters()) + sum(p.numel() for p in b.experts.parameters())
    return total


# ---- earlier stages' records ----------------------------------------------------------------------------

_EXPERT_LINEAR = re.compile(r"(.+)\.experts\.(gate_up|down)\.(\d+)")


def follow_experts(stages: list[dict], removed: dict[str, list[int]], model: nn.Module) -> list[dict]:
    """Earlier stages' per-linear records (a quantize stage's metrics, per-layer formats and bit allocation) after
    ``removed`` experts went from ``model``'s blocks: a removed expert's linears are dropped and a kept one's take
    its new index (they named layers that no longer exist, and other experts'). An allocation's achieved bits per
    weight and format counts are recomputed over the linears left; a stage's ``bits_per_weight``, measured over the
    removed experts too, is kept as ``BITS_BEFORE_EXPERT_PRUNING``. Nothing changes where no expert went (HEAPr
    removes neurons, not experts)."""
    if not any(removed.values()):
        return stages

    def rename(name):
        m = _EXPERT_LINEAR.fullmatch(str(name))
        if m is None or m[1] not in removed:
            return name
        e, gone = int(m[3]), removed[m[1]]
        return None if e in gone else f"{m[1]}.experts.{m[2]}.{e - sum(g < e for g in gone)}"

    def follow(d):
        if isinstance(d, list):
            return [n for n in map(rename, d) if n is not None]
        return {n: v for k, v in d.items() if (n := rename(k)) is not None} if isinstance(d, dict) else d

    out = []
    for stage in copy.deepcopy(stages):
        metrics = stage.get("metrics")
        if isinstance(metrics, dict) and isinstance(metrics.get("bits_per_weight"), (int, float)):
            metrics[BITS_BEFORE_EXPERT_PRUNING] = metrics.pop("bits_per_weight")
        layers = metrics.get("layers") if isinstance(metrics, dict) else None
        if isinstance(layers, dict) and stage.get("kind") != moe.KIND:
            metrics["layers"] = follow(layers)
            config = stage.get("config")
            if isinstance(config, dict) and isinstance(config.get("formats"), dict):
                config["formats"] = follow(config["formats"])
            alloc = metrics["layers"].get("_allocation")
            if isinstance(alloc, dict):
                for key in ("bits", "expert_importance", "no_calibration_tokens"):
                    if key in alloc:
                        alloc[key] = follow(alloc[key])
                _recount(alloc, config, model)
        out.append(stage)
    return out


def _recount(alloc: dict, config, model: nn.Module) -> None:
    """An allocation's achieved bits per weight and format counts over the linears it still holds."""
    from llmcomp.core.config import from_dict
    from llmcomp.quant.allocate import average_bits

    try:
        chosen = {n: from_dict(config["formats"][n]) for n in alloc["bits"]}
        shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in chosen}
        counts = {k: sum(f.describe() == k for f in chosen.values()) for k in alloc["layers_per_format"]}
        achieved = round(average_bits(chosen, shapes), 4)
    except (KeyError, TypeError, AttributeError, UserError, ZeroDivisionError):  # (a hand-edited manifest)
        return
    alloc.update(achieved_bits_per_weight=achieved, layers_per_format=counts)
