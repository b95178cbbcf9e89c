"""MoE blocks in transformers 5 models: find them, and remove routed experts or their neurons.

transformers 5 keeps a block's routed experts fused (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4-MoE ...)::

    block.gate                 router: weight [E, H] (+ e_score_correction_bias [E] in sigmoid routers)
    block.experts.gate_up_proj [E, 2I, H]   gate rows 0..I-1, then up rows
    block.experts.down_proj    [E, H, I]

Removing experts slices every tensor of the router and the experts whose first dimension is E, and
patches ``num_experts`` on the modules. When every block keeps the same count (and the same
intermediate size) the config's counts change with them, so stock ``from_pretrained`` loads the
result. Otherwise the shapes are recorded in the manifest stage (kind ``moe``) and the stage hook
resizes llmcomp.load's meta skeleton before tensors arrive. Removing neurons (atomic experts) leaves
experts of different widths, and quantizing experts needs linears: both use ``LinearExperts`` (one
``nn.Linear`` pair per expert; same routing, same math).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmcomp.core.model import decoder_layers
from llmcomp.errors import UserError

COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config / module names of E
KIND = "moe"


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` [out, in] (no initialization; zero widths allowed)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _dense(mod: nn.Module) -> torch.Tensor:
    """The weight of a linear, dequantized if it is a QuantLinear."""
    return mod.weight if isinstance(mod, nn.Linear) else mod.dequantize()


class LinearExperts(nn.Module):
    """Routed experts as separate linears: expert ``e`` is ``gate_up[e]`` (H → 2·I_e, gate rows then up
    rows) and ``down[e]`` (I_e → H). Widths may differ (HEAPr), and every linear can be quantized like
    any other (``llmcomp quantize`` unfuses MoE experts into this). Forward matches the fused experts'
    eager forward; slots with routing weight 0 (dynamic skipping) are not computed."""

    def __init__(self, gate_up: list[torch.Tensor], down: list[torch.Tensor], act_fn):
        super().__init__()
        self.gate_up = nn.ModuleList(_linear(w) for w in gate_up)
        self.down = nn.ModuleList(_linear(w) for w in down)
        self.num_experts = len(self.down)
        self.act_fn = act_fn

    @property
    def sizes(self) -> list[int]:
        return [m.in_features for m in self.down]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if e >= self.num_experts or self.down[e].in_features == 0:
                continue
            token, pos = torch.where((top_k_index == e) & (top_k_weights != 0))
            if token.numel() == 0:
                continue
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


@dataclass
class MoEBlock:
    """One sparse MoE block: ``path`` (e.g. ``model.layers.3.mlp``) and its router and experts."""

    path: str
    layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(getattr(self.router, "top_k", None) or getattr(self.block, "top_k"))

    @property
    def unfused(self) -> bool:
        return isinstance(self.experts, LinearExperts)

    @property
    def sizes(self) -> list[int]:
        """Neurons per expert."""
        if self.unfused:
            return self.experts.sizes
        return [int(self.experts.down_proj.shape[-1])] * self.num_experts

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert ``e`` as (gate [I, H], up [I, H], down [H, I]) (dequantized if quantized)."""
        ex = self.experts
        if self.unfused:
            gate, up = _dense(ex.gate_up[e]).chunk(2, dim=0)
            return gate, up, _dense(ex.down[e])
        gate, up = ex.gate_up_proj[e].chunk(2, dim=0)
        return gate, up, ex.down_proj[e]

    def act(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Neuron activations act(gate·x)·(up·x) of expert ``e``: x [T, H] → [T, I]."""
        gate, up, _ = self.weights(e)
        return self.experts.act_fn(F.linear(x, gate)) * F.linear(x, up)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's own (weights [T, k], index [T, k]) for x [T, H]."""
        _, weights, index = self.router(x)
        return weights, index


def _supported_experts(path: str, experts: nn.Module) -> None:
    if isinstance(experts, LinearExperts):
        return
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
        raise UserError(f"MoE block {path}: experts without fused 3-D gate_up_proj/down_proj tensors are not supported.")
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) or not getattr(experts, "is_concatenated", True):
        raise UserError(f"MoE block {path}: transposed, biased or interleaved expert tensors are not supported.")


def find_moe_blocks(model: nn.Module, strict: bool = True) -> list[MoEBlock]:
    """Every sparse MoE block under the model's decoder layers (dense layers are skipped). Blocks whose
    expert layout is not supported raise UserError, or are skipped when ``strict`` is False."""
    prefix, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        for name, mod in layer.named_children():
            router, experts = getattr(mod, "gate", None), getattr(mod, "experts", None)
            if router is None or experts is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
                continue
            path = f"{prefix}.{i}.{name}"
            try:
                _supported_experts(path, experts)
            except UserError:
                if strict:
                    raise
                continue
            out.append(MoEBlock(path, i, mod, router, experts))
    return out


def require_moe(model: nn.Module, name: str = "The model", job: str = "expert pruning") -> list[MoEBlock]:
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UserError(f"{name} ({type(model).__name__}) has no MoE blocks; {job} needs a mixture-of-experts model.")
    return blocks


def _slice_first_dim(module: nn.Module, old: int, index: torch.Tensor) -> None:
    """Slice every direct parameter and buffer of ``module`` whose first dimension is ``old``."""
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t.dim() >= 1 and t.shape[0] == old:
            new = t.data[index.to(t.device)].clone()
            if isinstance(t, nn.Parameter):
                setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                module._buffers[name] = new


def _set_count(module: nn.Module, old: int, new: int) -> None:
    for key in COUNT_KEYS:
        if getattr(module, key, None) == old and isinstance(getattr(module, key), int):
            setattr(module, key, new)


def keep_experts(b: MoEBlock, keep) -> None:
    """Keep only routed experts ``keep`` (router rows, correction bias, fused tensors or linears)."""
    old = b.num_experts
    keep = sorted(int(k) for k in keep)
    groups = getattr(b.router, "num_group", None) or getattr(b.router, "n_group", None) or 1
    if groups > 1 and len(keep) != old:
        raise UserError(f"MoE block {b.path} routes by expert groups ({groups}); removing experts from "
                        "group-limited routers is not supported.")
    if len(keep) < b.top_k:
        raise UserError(f"{b.path}: keeping {len(keep)} experts leaves fewer than top_k = {b.top_k} to route to.")
    index = torch.tensor(keep, dtype=torch.long)
    _slice_first_dim(b.router, old, index)
    if b.unfused:
        b.experts.gate_up = nn.ModuleList(b.experts.gate_up[e] for e in keep)
        b.experts.down = nn.ModuleList(b.experts.down[e] for e in keep)
    else:
        _slice_first_dim(b.experts, old, index)
    for m in (b.block, b.router, b.experts):
        _set_count(m, old, len(keep))


def unfuse(b: MoEBlock) -> None:
    """Replace fused experts by ``LinearExperts`` (same weights, same outputs)."""
    if b.unfused:
        return
    ex = b.experts
    new = LinearExperts([w.detach() for w in ex.gate_up_proj.data], [w.detach() for w in ex.down_proj.data],
                        ex.act_fn)
    b.block.experts = new
    b.experts = new


def keep_neurons(b: MoEBlock, keep: list[torch.Tensor], scales: list[torch.Tensor] | None = None) -> None:
    """Keep neurons ``keep[e]`` (indices into expert e) of every expert; ``scales[e]`` multiplies the kept
    neurons' down_proj columns (output-space compensation). Equal widths stay fused, others unfuse."""
    keep = [torch.as_tensor(k, dtype=torch.long) for k in keep]
    if scales is not None:  # scales follow their neurons into sorted order
        scales = [s[k.argsort()] for s, k in zip(scales, keep)]
    keep = [k.sort().values for k in keep]
    widths = [len(k) for k in keep]
    if len(set(widths)) > 1:
        unfuse(b)
    ex = b.experts
    if b.unfused:
        if not all(isinstance(m, nn.Linear) for m in [*ex.gate_up, *ex.down]):
            raise UserError(f"{b.path}: removing neurons from quantized experts is not supported; prune first.")
        for e, k in enumerate(keep):
            I = ex.down[e].in_features
            gu, down = ex.gate_up[e].weight.data, ex.down[e].weight.data
            down = down[:, k.to(down.device)]
            if scales is not None:
                down = down * scales[e].to(down)[None, :]
            ex.gate_up[e] = _linear(gu[torch.cat([k, k + I]).to(gu.device)].clone())
            ex.down[e] = _linear(down.clone())
        return
    I, idx = b.sizes[0], torch.stack(keep)
    gu = ex.gate_up_proj.data
    rows = torch.cat([idx, idx + I], dim=1).to(gu.device)  # [E, 2I']
    new_gu = torch.gather(gu, 1, rows[..., None].expand(-1, -1, gu.shape[-1]))
    down = ex.down_proj.data
    new_down = torch.gather(down, 2, idx.to(down.device)[:, None, :].expand(-1, down.shape[1], -1))
    if scales is not None:
        new_down = new_down * torch.stack(scales).to(new_down)[:, None, :]
    ex.gate_up_proj = nn.Parameter(new_gu.contiguous(), requires_grad=False)
    ex.down_proj = nn.Parameter(new_down.contiguous(), requires_grad=False)
    if hasattr(ex, "intermediate_dim"):
        ex.intermediate_dim = widths[0]


# ---- shapes: config patching, manifest record, skeleton resizing ---------------------------------------

def shapes(model: nn.Module) -> dict[str, dict]:
    """``{block path: {"experts": E, "sizes": [neurons per expert], "unfused": bool}}`` for every MoE block."""
    return {b.path: {"experts": b.num_experts, "sizes": b.sizes, "unfused": b.unfused} for b in find_moe_blocks(model)}


def _intermediate_key(config) -> str:
    keys = config.to_dict()
    return "moe_intermediate_size" if "moe_intermediate_size" in keys else "intermediate_size"


def sync_config(model: nn.Module) -> bool:
    """Patch the config's expert count and width when every block agrees (stock loading works);
    returns whether it did. Non-uniform models keep the config and rely on the manifest shapes."""
    blocks = find_moe_blocks(model)
    counts = {b.num_experts for b in blocks}
    widths = {w for b in blocks for w in b.sizes}
    if len(counts) != 1 or len(widths) != 1 or any(b.unfused for b in blocks):
        return False
    cfg, keys = model.config, model.config.to_dict()
    for key in COUNT_KEYS:
        if key in keys:
            setattr(cfg, key, next(iter(counts)))
    setattr(cfg, _intermediate_key(cfg), next(iter(widths)))
    return True


def resize_skeleton(model: nn.Module, recorded: dict[str, dict]) -> None:
    """Give a (meta) skeleton's MoE blocks the recorded shapes, so the artifact's tensors fit."""
    blocks = {b.path: b for b in find_moe_blocks(model)}
    for path, want in recorded.items():
        b = blocks.get(path)
        if b is None:
            raise UserError(f"Artifact records MoE block {path}, which the model config does not have.")
        if b.num_experts != want["experts"]:
            keep_experts(b, range(want["experts"]))
        if want.get("unfused"):
            unfuse(b)
        sizes = [int(s) for s in want["sizes"]]
        if b.sizes != sizes:
            keep_neurons(b, [torch.arange(s) for s in sizes])


# ---- dynamic skipping (MC-MoE online pruning) ---------------------------------------------------------

def _skip_hook(threshold: float):
    def hook(module, inputs, output):
        logits, weights, index = output
        top = weights.max(dim=-1, keepdim=True).values
        drop = (weights < threshold * top) & (weights < top)
        return logits, weights.masked_fill(drop, 0.0), index
    return hook


def install_skip(model: nn.Module, threshold: float) -> None:
    """Per token, give routing weight 0 to every chosen expert but the first whose weight is below
    ``threshold`` × the first one's (LinearExperts then skip computing it; fused experts add 0)."""
    remove_skip(model)  # (an earlier threshold's hook)
    for b in find_moe_blocks(model, strict=False):
        b.router._llmcomp_skip = b.router.register_forward_hook(_skip_hook(threshold))
        b.router.skip_threshold = threshold


def remove_skip(model: nn.Module) -> None:
    """Undo ``install_skip``: routers route as they were trained (a new threshold is calibrated on that routing,
    not on one an earlier threshold already masked — there its zeroed slots pulled the quantile to 0)."""
    for b in find_moe_blocks(model, strict=False):
        old = getattr(b.router, "_llmcomp_skip", None)
        if old is not None:
            old.remove()
            del b.router._llmcomp_skip, b.router.skip_threshold


class _MoEStageHook:
    """Manifest stages of kind ``moe`` carry ``shapes`` (the last one describes the artifact) and may
    carry a dynamic ``skip_threshold`` (re-installed on the loaded model)."""

    def skeleton(self, model, stage: dict) -> None:
        resize_skeleton(model, stage["shapes"])

    def ready(self, model, stage: dict) -> None:
        if stage.get("skip_threshold") is not None:  # (a later dynamic stage replaces an earlier one's)
            install_skip(model, float(stage["skip_threshold"]))


def register_hook() -> None:
    from llmcomp.core.artifact import STAGE_HOOKS, register_stage_hook

    if KIND not in STAGE_HOOKS:
        register_stage_hook(KIND, _MoEStageHook())


register_hook()
