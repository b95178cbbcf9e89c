"""The quantization-method contract and the model-level driver shared by every method.

A method is a frozen config dataclass (with ``method`` naming it) plus a ``Quantizer`` registered for
that name. A quantizer turns one ``nn.Linear`` (and, if ``needs_calibration``, its statistics) into
a ``QuantLinear``. Walking the model, selection, calibration and progress live here, once.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from llmcomp.core import memory
from llmcomp.core.config import field_classes
from llmcomp.core.calib import calibrate_layerwise
from llmcomp.core.model import check_finite, decoder_layers, set_submodule
from llmcomp.core.numeric import all_finite
from llmcomp.core.progress import NULL, Progress
from llmcomp.core.qlinear import QuantLinear
from llmcomp.core.registry import Registry
from llmcomp.core.select import select, select_linears, unmatched
from llmcomp.errors import UserError
from llmcomp.formats.base import WeightFormat

METHODS: Registry[type] = Registry("quantization method")


@dataclass(frozen=True)
class QuantConfig:
    """Fields every method config has: which layers to quantize, and per-layer format overrides
    (``formats``: module path → format, e.g. from bit allocation; others use the config's ``format``)."""

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    formats: dict = field(default_factory=dict)

    method: ClassVar[str] = ""


@dataclass
class LayerResult:
    module: QuantLinear
    metrics: dict = field(default_factory=dict)


class Quantizer:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: QuantConfig):
        self.config = config

    def format_for(self, name: str):
        """The weight format for module ``name``: a per-layer override or the config's ``format``."""
        return self.config.formats.get(name, self.config.format)

    def layer_format(self, name: str, linear: nn.Linear):
        """``format_for(name)`` as it applies to this layer's shape (a method may fit it: VPTQ's outlier codebook)."""
        return self.format_for(name)

    def check_layers(self, model: nn.Module, names: list[str]) -> None:
        """A UserError where the selected layers together do not fit the config (``check_selection``, before any
        work); each layer's own shape is its format's ``validate_shape``."""

    def observe(self, linear: nn.Linear):
        """For calibrated methods: return a stateful forward hook ``fn(module, inputs, output)``.

        The driver registers it while the layer runs over all calibration inputs, then passes the same
        object to ``quantize_linear`` as ``stats`` (e.g. a Hessian accumulator).
        """
        return None

    def quantize_linear(self, name: str, linear: nn.Linear, stats=None) -> LayerResult:
        raise NotImplementedError


class HessianQuantizer(Quantizer):
    """A method that reads each layer's input Hessian (``quant/hessian.py``): GPTQ, VPTQ, decoupleQ. ``label`` names
    it in errors."""

    needs_calibration = True
    label: ClassVar[str] = ""

    def observe(self, linear: nn.Linear):
        from llmcomp.quant.hessian import HessianAccumulator

        return HessianAccumulator.for_linear(linear)

    def layer_weight(self, name: str, linear: nn.Linear, stats):
        """(format, fp32 weight) for layer ``name``, once its shape fits the format and its statistics exist."""
        fmt = self.layer_format(name, linear)
        fmt.validate_shape(linear.out_features, linear.in_features, name)
        require_stats(stats, self.label, name)
        return fmt, linear.weight.data.float()


def require_stats(stats, method: str, name: str) -> None:
    """A calibrated method's statistics for layer ``name`` must exist (they come from the driver)."""
    if stats is None or getattr(stats, "H", None) is None:
        raise UserError(f"{method} got no calibration statistics for {name}; it needs calibration data.")


def check_finite_inputs(name: str, stats) -> None:
    """Calibration statistics with NaN or inf (an activation that overflowed) are one error line naming the layer:
    GPTQ reported a Hessian "not positive definite" at any dampening, RTN W4A4 wrote NaN input scales."""
    H = getattr(stats, "H", None)
    if isinstance(H, torch.Tensor) and H.numel() and not all_finite(H):
        raise UserError(f"The calibration inputs of {name} are not finite (NaN or inf): the model's activations "
                        "overflow on the calibration text before this layer.")


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None where it is not a number a manifest (JSON) can hold: an
    all-zero weight (no signal; reproduced exactly, it is not the worst layer) or, in principle, no noise at all."""
    noise = (ref.float() - approx.float()).pow(2).sum()
    signal = ref.float().pow(2).sum()
    if float(signal) == 0 or float(noise) == 0:
        return None
    return round(float(10 * torch.log10(signal / noise)), 3)


@torch.no_grad()
def _replace(model: nn.Module, quantizer: Quantizer, name: str, linear: nn.Linear, stats, report: dict) -> None:
    check_finite(name, linear.weight)
    check_finite_inputs(name, stats)
    result = quantizer.quantize_linear(name, linear, stats)
    estimate = result.module.fmt.original_estimate(result.module.packed_tensors(), result.module.in_features)
    if not all_finite(estimate):  # e.g. a float16 scale or codebook entry past 65504
        raise UserError(f"{name}: its quantized weights are not finite (its largest weight, "
                        f"{float(linear.weight.abs().max()):.3g}, overflows the format's float16 scales); add it "
                        "to --ignore.")
    report[name] = {"sqnr_db": sqnr_db(linear.weight, estimate), **result.metrics}
    set_submodule(model, name, result.module)


def shared_input_groups(runner, linears: list[nn.Module]) -> list[list[nn.Module]]:
    """Group ``linears`` by the tensor they receive, probed on one calibration batch."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def probe(mod, inputs):
        seen[mod] = inputs[0]  # holding the tensor keeps its memory from being reused by another

    handles = [m.register_forward_pre_hook(probe) for m in linears]
    try:
        runner.run(batches=1)
    finally:
        for h in handles:
            h.remove()
    groups: dict[tuple, list[nn.Module]] = {}
    for m in linears:
        x = seen.get(m)
        groups.setdefault(("seen", id(x)) if x is not None else ("unseen", id(m)), []).append(m)
    return list(groups.values())


def _no_tokens(stats, linear: nn.Module) -> bool:
    """A Hessian accumulator no calibration token reached (an MoE expert never routed to) becomes the
    identity: the method then minimizes the plain weight error (GPTQ: exactly RTN). True if so."""
    from llmcomp.quant.hessian import HessianAccumulator

    if not isinstance(stats, HessianAccumulator) or not stats.empty:
        return False
    stats.H = 2.0 * torch.eye(linear.in_features, dtype=torch.float32, device=linear.weight.device)
    return True


def _first_of_group(m: nn.Module, stats: dict) -> bool:
    return next(k for k, v in stats.items() if v is stats[m]) is m


def _check_patterns(model: nn.Module, config, fields) -> None:
    """A pattern a user wrote that matches no module was misspelt (the defaults, Linear and lm_head, may well match
    nothing); a re: pattern that matches part of a path is told it must match all of it."""
    defaults = {"targets": ("Linear",), "ignore": ("lm_head",)}
    for name in fields:
        missed = unmatched(model, [p for p in getattr(config, name) if p not in defaults[name]])
        if not missed:
            continue
        hint = "check its spelling (a class name, a path or its dotted suffix, or re:REGEX)"
        if missed[0].startswith("re:"):
            part = next((n for n, _ in model.named_modules() if n and re.search(missed[0][3:], n)), None)
            if part is not None:
                hint = (f"re: must match a whole path, such as {part!r} (re:.*{missed[0][3:]}.* matches part of "
                        "one)")
        raise UserError(f"Layer pattern {missed[0]!r} ({name}) matches no module of the model; {hint}.")


@torch.no_grad()
def check_selection(model: nn.Module, config, quantizer: Optional[Quantizer] = None) -> list[str]:
    """The names of the layers ``config``'s targets and ignore patterns select; a UserError where none is, where
    a pattern the user wrote matches no module or (given the ``quantizer``) where a layer's shape does not fit its
    format. ``api.quantize`` checks before calibration and the resume folder, ``quantize_model`` again."""
    chosen = [n for n, _ in select_linears(model, config.targets, config.ignore)]
    if not chosen:
        done = sum(isinstance(m, QuantLinear) for m in model.modules())
        if done and not any(type(m) is nn.Linear for _, m in select(model, ("Linear",), config.ignore)):
            raise UserError(f"No unquantized layer matches targets {list(config.targets)} (minus ignore "
                            f"{list(config.ignore)}): the model's {done} linear layers are quantized already; "
                            "quantize the original model instead.")
        _check_patterns(model, config, ("targets",))
        conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        if conv:  # (GPT-2's; the hint below offered --ignore '', which would quantize its tied head alone)
            raise UserError(f"{type(model).__name__} holds its projections as transformers' Conv1D ({len(conv)} "
                            f"layers, e.g. {conv[0]}), not nn.Linear; llmcomp quantizes nn.Linear layers only.")
        hidden = [n for n, _ in select_linears(model, config.targets, ())]
        if hidden:
            default = " (lm_head is ignored by default: --ignore '' lifts that)" if (
                "lm_head" in config.ignore and any(n.split(".")[-1] == "lm_head" for n in hidden)) else ""
            raise UserError(f"Every layer targets {list(config.targets)} select is ignored by "
                            f"{list(config.ignore)}{default}.")
        done = [n for n, m in select(model, config.targets, config.ignore) if isinstance(m, QuantLinear)]
        if done:
            raise UserError(f"The {len(done)} linear layers targets {list(config.targets)} select are quantized "
                            "already; quantize the original model instead.")
        raise UserError(f"No linear layer is under targets {list(config.targets)}.")
    _check_patterns(model, config, ("targets", "ignore"))
    formats = getattr(config, "formats", None) or {}
    odd = next((k for k, f in formats.items() if not isinstance(f, WeightFormat)), None)
    if odd is not None:
        raise UserError(f"The per-layer format of {odd!r} must be a weight format such as Uniform(bits=8), got "
                        f"{formats[odd]!r}.")
    kinds = field_classes(type(config), "format")  # (another kind failed deep inside the quantizer, a traceback)
    odd = next((k for k, f in formats.items() if kinds and not isinstance(f, kinds)), None)
    if odd is not None:
        raise UserError(f"The per-layer format of {odd!r} must be {' or '.join(c.__name__ for c in kinds)} for "
                        f"method {config.method}, as its format is; got {type(formats[odd]).__name__}.")
    stray = sorted(set(formats) - set(chosen))
    if stray:  # (a dotted suffix or an ignored layer: its format was dropped and the default used, silently)
        raise UserError(f"A per-layer format names {stray[0]!r}, which is not a layer this job quantizes; per-layer "
                        "formats take full module paths (model.layers.0.mlp.down_proj) of selected layers.")
    if (quantizer or METHODS.get(config.method)(config)).needs_calibration:  # (with an allocation: before its pass)
        prefix, _ = decoder_layers(model)
        outside = [n for n in chosen if not n.startswith(prefix + ".")]
        if outside:
            raise UserError(f"Method {config.method} only quantizes decoder layers; add {outside[0]} to --ignore.")
    if quantizer is not None:
        _check_shapes(model, quantizer, chosen)
    return chosen


def _check_shapes(model: nn.Module, quantizer: Quantizer, names: list[str]) -> None:
    """Every layer's shape against its format before any work: one error line, not one minutes in. (A function of
    its own: a loop variable in ``quantize_model`` would keep the last original linear alive to the end.)"""
    for name in names:
        lin = model.get_submodule(name)
        quantizer.layer_format(name, lin).validate_shape(lin.out_features, lin.in_features, name)
    quantizer.check_layers(model, names)


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calib_ids: Optional[torch.Tensor] = None,
    progress: Progress = NULL,
    device: Optional[str] = None,
    batch_size: int = 8,
    checkpoint=None,
) -> dict:
    """Quantize ``model`` in place. Returns per-layer metrics ``{path: {...}}``. ``checkpoint``
    (core/resume.py): calibrated methods save each finished decoder layer there and restore the ones
    a killed earlier run finished."""
    quantizer: Quantizer = METHODS.get(config.method)(config)
    # Names, not modules: a replaced nn.Linear must be freed at once (on the GPU it would otherwise stay
    # there after its decoder layer went home — one original layer per finished layer).
    chosen = check_selection(model, config, quantizer)
    report: dict = {}
    start = time.perf_counter()
    if not quantizer.needs_calibration:
        for name in progress.track(chosen, "Quantizing layers"):
            _replace(model, quantizer, name, model.get_submodule(name), None, report)
    else:
        if calib_ids is None:
            raise UserError(f"Method {config.method} needs calibration data.")
        unseen: list[str] = []  # linears no calibration token reached

        def handler(path, layer, runner):
            linears = [(n, model.get_submodule(n)) for n in chosen if n.startswith(path + ".")]
            index = int(path.rsplit(".", 1)[1])
            if checkpoint is not None and checkpoint.has(index):
                checkpoint.restore(model, index, report)
                return
            stats = {}
            for group in shared_input_groups(runner, [m for _, m in linears]):
                # Linears fed by the same tensor (q/k/v, gate/up) share one statistics object.
                hook = quantizer.observe(group[0])
                stats.update({m: hook for m in group})
            runner.run({m: h for m, h in stats.items() if h is not None and _first_of_group(m, stats)},
                       keep_outputs=False)
            for n, m in linears:
                blind = _no_tokens(stats[m], m)
                _replace(model, quantizer, n, m, stats[m], report)
                if blind:
                    report[n]["no_calibration_tokens"] = True
                    unseen.append(n)
            stats.clear()
            if checkpoint is not None:
                checkpoint.save(model, index, [n for n, _ in linears], report)

        calibrate_layerwise(model, calib_ids, handler, batch_size=batch_size, device=device, progress=progress,
                            reach=chosen, remedy=memory.QUANTIZE_REMEDY)
        if unseen:
            warnings.warn(f"{len(unseen)} linear layer(s) received no calibration tokens (e.g. {unseen[0]}: an "
                          f"MoE expert its router never chose); {config.method} quantized them against their "
                          f"weights alone (identity Hessian). They are marked no_calibration_tokens in the report.",
                          stacklevel=2)
    report["_wall_time_s"] = round(time.perf_counter() - start, 2)
    return report
