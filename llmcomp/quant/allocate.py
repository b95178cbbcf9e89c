"""Per-layer bit allocation under an average bits-per-weight budget.

1. Measure, for every target linear and every candidate bit width b, how much round-to-nearest at b
   hurts (``Ŵ_b``), with one of two sensitivities:
   - ``fisher`` (default): the model's loss, to second order, ``Σ F ⊙ (W − Ŵ_b)²`` with ``F`` the
     diagonal empirical Fisher information (squared per-sequence gradients of the next-token loss on
     calibration text, as SqueezeLLM weights its k-means). It sees what a layer's error does to the
     *output of the model*, so errors of different layers are comparable. Needs one forward+backward of
     the whole model per sequence where the model lives (or on ``device`` when it fits there).
   - ``output``: the layer-output error ``tr((W − Ŵ_b) H (W − Ŵ_b)ᵀ)`` with ``H = 2XᵀX/n``, measured
     layer by layer (bounded memory). Errors of different layers are not on one scale — on the bundled
     model it gave early layers 2 bits and lost badly to uniform widths (bench/results, README).
   A linear no calibration token reaches (an MoE expert its router never chose) scores 0 at every width.
2. A greedy knapsack picks one width per layer: start everyone at the cheapest candidate, then keep
   applying the upgrade with the largest error reduction per extra bit that still fits the budget.
   Costs are exact: ``bits_per_weight`` of the format (codes + scales + zeros) × the layer's weights.
3. The chosen method (rtn, gptq, decoupleq) then quantizes each layer in its chosen format
   (``QuantConfig.formats``); the allocation is recorded in the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core import memory
from llmcomp.core.calib import calibrate_layerwise
from llmcomp.core.config import register_config
from llmcomp.core.model import decoder_layers
from llmcomp.core.progress import NULL, Progress
from llmcomp.core.select import select_linears
from llmcomp.errors import UserError
from llmcomp.formats.uniform import Uniform
from llmcomp.quant.hessian import HessianAccumulator, check_damp
from llmcomp.quant.rtn import rtn_fields


SENSITIVITIES = ("fisher", "output")


@register_config
@dataclass(frozen=True)
class AllocationConfig:
    """Average ``budget`` bits per weight (scales and zeros included) over the target linears."""

    budget: float = 3.25
    candidates: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 128
    symmetric: bool = False
    damp: float = 0.01
    sensitivity: str = "fisher"
    fisher_samples: int = 32

    VERSION = 2

    def __post_init__(self):
        if not self.candidates or any(not isinstance(b, int) or not 2 <= b <= 8 for b in self.candidates):
            raise UserError(f"Allocation candidates must be integers from 2 to 8, got {list(self.candidates)}.")
        for b in self.candidates:
            Uniform(bits=b, group_size=self.group_size, symmetric=self.symmetric)  # validates the group size
        widths = sorted(set(self.candidates))
        # (scales and zeros included, on whole groups: a layer's ragged last group costs a little more, which
        # check_budget counts on the real shapes; g16 asym makes int4 cost 6 bits, and 5.5 was refused as too high)
        floor, ceiling = (round(f.bits_per_weight(1, 64 * max(self.group_size, 64)), 4)
                          for f in (self.formats()[0], self.formats()[-1]))
        if not self.group_size:  # (per-channel overhead shrinks with the layer's width: check_budget counts it)
            floor = widths[0]
        if not self.budget >= floor:
            raise UserError(f"A budget of {self.budget:g} bits per weight cannot be met with candidate widths "
                            f"{widths} (at {widths[0]} bits, scales and zeros included: {floor:g}); choose a budget "
                            f"of at least {floor:g}.")
        if not self.budget <= ceiling + 1:
            raise UserError(f"A budget of {self.budget:g} bits per weight is past every candidate width {widths} "
                            f"(all at {widths[-1]} bits, scales and zeros included, cost {ceiling:g} and would leave "
                            f"it unspent); choose a budget of at most {ceiling + 1:g}, or whole --bits for one width.")
        if self.sensitivity not in SENSITIVITIES:
            raise UserError(f"Unknown allocation sensitivity {self.sensitivity!r}; choose one of {', '.join(SENSITIVITIES)}.")
        if self.fisher_samples < 1:
            raise UserError(f"fisher_samples must be at least 1, got {self.fisher_samples}.")
        check_damp(self.damp, "Allocation")

    def formats(self) -> list[Uniform]:
        return [Uniform(bits=b, group_size=self.group_size, symmetric=self.symmetric) for b in sorted(set(self.candidates))]


def rtn_deltas(linear: nn.Linear, formats: list[Uniform]):
    """``W − Ŵ_b`` (float32) for each candidate format, one at a time."""
    W = linear.weight.data.float()
    for fmt in formats:
        yield W - fmt.dequantize(fmt.pack(rtn_fields(W, fmt)), W.shape[1]).to(W.device)


def layer_errors(linear: nn.Linear, H: torch.Tensor, formats: list[Uniform]) -> list[float]:
    return [float(((D @ H) * D).sum()) for D in rtn_deltas(linear, formats)]


def measure_errors(model: nn.Module, calib_ids: torch.Tensor, targets, ignore, cfg: AllocationConfig,
                   device=None, progress: Progress = NULL, batch_size: int = 8) -> dict[str, dict]:
    """``{path: {"weights": n, "errors": [err per candidate format]}}`` for every target linear
    (``batch_size``: the windows a layer-by-layer pass runs at once, --calib-batch)."""
    chosen = dict(select_linears(model, targets, ignore))
    if cfg.sensitivity == "fisher":
        return fisher_errors(model, calib_ids, chosen, cfg, device=device, progress=progress)
    return output_errors(model, calib_ids, chosen, cfg, device=device, progress=progress, batch_size=batch_size)


def unseen_entry(linear: nn.Linear, formats: list[Uniform]) -> dict:
    """The table entry of a linear no calibration token reached (an MoE expert its router never chose):
    its error reaches no calibration output, so both sensitivities score it 0 at every width (MC-MoE's
    routing mass, 0 there, says the same) and the allocator leaves it at the cheapest width."""
    return {"weights": linear.weight.numel(), "errors": [0.0] * len(formats), "unseen": True}


def fisher_diagonal(model: nn.Module, calib_ids: torch.Tensor, chosen: dict[str, nn.Linear], samples: int,
                    progress: Progress = NULL) -> dict[str, torch.Tensor | None]:
    """Sum over ``samples`` calibration sequences of each chosen weight's squared loss gradient (float32),
    on the device the model is on; None for a weight no forward used (an MoE expert never routed to).
    Gradients are enabled for the chosen weights only, then restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    F = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in chosen.items()}
    reached: set[str] = set()
    originals = {n: m.weight for n, m in chosen.items()}
    try:
        for m in chosen.values():  # a leaf of its own over the same storage: a weight tied to another module (a tied
            m.weight = nn.Parameter(m.weight.detach(), requires_grad=True)  # lm_head) takes only its own gradient
        with torch.enable_grad():
            for ids in progress.track(calib_ids[:samples].split(1), "Fisher information (allocation)",
                                      total=min(samples, len(calib_ids))):
                ids = ids.to(home)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                for n, m in chosen.items():
                    if m.weight.grad is not None:
                        F[n].add_(m.weight.grad.float().square())
                        reached.add(n)
                    m.weight.grad = None
    finally:
        for n, m in chosen.items():
            m.weight = originals[n]
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return {n: F[n] if n in reached else None for n in chosen}


def fisher_errors(model: nn.Module, calib_ids: torch.Tensor, chosen: dict[str, nn.Linear], cfg: AllocationConfig,
                  device=None, progress: Progress = NULL) -> dict[str, dict]:
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    moved = device != home
    try:
        if moved:
            model.to(device)
        F = fisher_diagonal(model, calib_ids, chosen, cfg.fisher_samples, progress)
    except torch.OutOfMemoryError:
        raise UserError(f"The Fisher sensitivity needs the whole model and its gradients on {device}, and they do "
                        "not fit; use --sensitivity output (layer by layer, bounded memory).") from None
    finally:
        if moved:
            model.to(home)
    formats = cfg.formats()
    with torch.no_grad():
        return {n: unseen_entry(m, formats) if F[n] is None else
                {"weights": m.weight.numel(),
                 "errors": [float((F[n] * D.to(F[n].device).square()).sum()) for D in rtn_deltas(m, formats)]}
                for n, m in chosen.items()}


@torch.no_grad()
def output_errors(model: nn.Module, calib_ids: torch.Tensor, chosen: dict[str, nn.Linear], cfg: AllocationConfig,
                  device=None, progress: Progress = NULL, batch_size: int = 8) -> dict[str, dict]:
    formats = cfg.formats()
    table: dict[str, dict] = {}
    prefix, _ = decoder_layers(model)  # (a layer outside them was refused only after the whole pass)
    outside = sorted(n for n in chosen if not n.startswith(prefix + "."))
    if outside:
        raise UserError(f"Bit allocation with --sensitivity output only covers decoder layers; add {outside[0]} to "
                        "--ignore.")

    def handler(path, layer, runner):
        linears = [(n, m) for n, m in chosen.items() if n.startswith(path + ".")]
        accs = {m: HessianAccumulator.for_linear(m) for _, m in linears}
        runner.run(accs)
        for n, m in linears:
            if accs[m].empty:  # an MoE expert no calibration token was routed to
                table[n] = unseen_entry(m, formats)
                continue
            H = accs[m].finalize(cfg.damp).H
            table[n] = {"weights": m.weight.numel(), "errors": layer_errors(m, H, formats)}
            accs[m].release()

    calibrate_layerwise(model, calib_ids, handler, batch_size=batch_size, device=device, progress=progress,
                        reach=chosen, remedy=memory.QUANTIZE_REMEDY)
    missing = set(chosen) - set(table)
    if missing:
        raise UserError(f"Bit allocation only covers decoder layers; add {sorted(missing)[0]} to --ignore.")
    return table


def check_budget(formats: list[Uniform], budget: float, shapes: dict[str, tuple[int, int]]) -> None:
    """The cheapest candidate (scales and zeros included, on these layer shapes) must fit ``budget``: checked from
    the shapes before any measuring, and again by ``solve``."""
    total_w = sum(o * i for o, i in shapes.values())
    spent = sum(formats[0].bits_per_weight(o, i) * o * i for o, i in shapes.values())
    if total_w and spent > budget * total_w * (1 + 1e-12):
        raise UserError(f"Budget {budget} bits/weight is below the cheapest candidate "
                        f"({spent / total_w:.3f} bits/weight with {formats[0].describe()}).")
    costly = sum(formats[-1].bits_per_weight(o, i) * o * i for o, i in shapes.values())
    if total_w and budget * total_w >= costly:  # (every layer would take the widest: a calibration pass for nothing)
        raise UserError(f"Budget {budget} bits/weight reaches the widest candidate, {formats[-1].describe()} "
                        f"({costly / total_w:.3f} bits/weight with its scales): quantize at --bits "
                        f"{formats[-1].bits} instead, or give a budget below it.")


def solve(table: dict[str, dict], formats: list[Uniform], budget: float, shapes: dict[str, tuple[int, int]]
          ) -> dict[str, Uniform]:
    """Greedy knapsack: one format per layer, average bits/weight ≤ ``budget``, small total error."""
    check_budget(formats, budget, {n: shapes[n] for n in table})
    total_w = sum(t["weights"] for t in table.values())
    cost = {n: [f.bits_per_weight(*shapes[n]) * t["weights"] for f in formats] for n, t in table.items()}
    pick = {n: 0 for n in table}
    spent = sum(cost[n][0] for n in table)
    limit = budget * total_w
    while True:
        best, best_gain = None, 0.0
        for n, t in table.items():
            i = pick[n]
            for j in range(i + 1, len(formats)):
                extra = cost[n][j] - cost[n][i]
                if spent + extra > limit:
                    continue
                gain = (t["errors"][i] - t["errors"][j]) / max(extra, 1e-12)
                if gain > best_gain:
                    best, best_gain = (n, j, extra), gain
        if best is None:
            break
        n, j, extra = best
        pick[n] = j
        spent += extra
    return {n: formats[j] for n, j in pick.items()}


def average_bits(assignment: dict[str, Uniform], shapes: dict[str, tuple[int, int]]) -> float:
    total = sum(o * i for o, i in shapes.values())
    return sum(f.bits_per_weight(*shapes[n]) * shapes[n][0] * shapes[n][1] for n, f in assignment.items()) / total
