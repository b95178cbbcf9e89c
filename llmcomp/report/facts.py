"""What a report shows, read from a manifest into plain data (no plotting here, so it is testable alone).

Manifest stages differ by kind; each ``*_facts`` function takes one stage and returns ``None`` when the
stage is not of its kind. Module paths are split at their first numeric component: the decoder layer
(``model.layers.3.self_attn.q_proj`` → layer 3, linear ``self_attn.q_proj``); further numbers (expert
indices) become ``*`` so the experts of one layer are one series.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from statistics import mean
from typing import Optional

from llmcomp.core.config import from_dict
from llmcomp.errors import UserError

# ``prune experts`` moves an earlier stage's bits per weight, measured over experts it removed, to this key
BITS_BEFORE_EXPERT_PRUNING = "bits_per_weight_before_expert_pruning"


def stage_bits(metrics) -> tuple[Optional[float], str]:
    """A stage's recorded bits per weight and what it covers: ``""``, or ``" before expert pruning"`` where a later
    ``prune experts`` removed experts it was measured over; (None, "") where there is none (a hand-edited manifest,
    unsealed, may hold anything)."""
    for key, note in (("bits_per_weight", ""), (BITS_BEFORE_EXPERT_PRUNING, " before expert pruning")):
        value = metrics.get(key) if isinstance(metrics, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value, note
    return None, ""


_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")
# canonical order of a decoder layer's linears; others follow alphabetically
_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "w1", "w3", "w2", "down")


def num(v) -> float:
    """A metric read back from a manifest: JSON null (how a NaN is written since the manifest became strict JSON)
    is NaN again."""
    return float("nan") if v is None else float(v)


def shown_config(config) -> dict:
    """A stage's config as ``inspect`` and ``report.md`` show it: no ``_`` keys, nested formats as their one-line
    description (``int4 g128 asym``), a bit allocation's per-layer formats counted, and settings that do nothing
    left out: the W4A4 ones (``act_format``, ``smooth``) of a weights-only run, an evicting KV policy's ``ratio``
    beside its token budget, ``compensate`` of an expert pruning other than HEAPr's. The manifest keeps all."""
    from llmcomp.formats.actquant import WEIGHTS_ONLY_UNUSED
    from llmcomp.prune.experts import METHODS as EXPERT_METHODS

    if not isinstance(config, dict):
        return {}
    unused = set(WEIGHTS_ONLY_UNUSED if config.get("act_bits") == 16 else ())
    if isinstance(config.get("budget"), int) and config["budget"] > 0:  # (an evicting KV policy keeps a budget:
        unused.add("ratio")  # its ratio, a default, does nothing)
    if config.get("method") in EXPERT_METHODS and config.get("method") != "heapr":  # (only HEAPr compensates)
        unused.add("compensate")
    shown = {k: _compact(v) for k, v in config.items() if not k.startswith("_") and k not in unused}
    if isinstance(config.get("formats"), dict):
        if config["formats"]:  # (a bit allocation's: hundreds of lines; its `format` is a placeholder, int8 there)
            shown["formats"] = f"<{len(config['formats'])} per-layer formats (bit allocation)>"
            shown.pop("format", None)
        else:
            del shown["formats"]
    return shown


def _compact(value):
    """A nested config as its one-line description (formats: ``int4 g128 asym``), else without ``_`` keys."""
    if isinstance(value, dict):
        if "_type" in value:
            try:
                return from_dict(value).describe()
            except (UserError, TypeError, AttributeError):
                pass
        return {k: _compact(v) for k, v in value.items() if not k.startswith("_")}
    return value


def split_path(path: str) -> tuple[Optional[int], str]:
    """``(decoder layer index, linear kind)``; ``(None, path)`` outside the decoder layers (``lm_head``)."""
    m = _LAYER.match(path)
    if m is None:
        return None, path
    return int(m["index"]), re.sub(r"(?<=\.)\d+(?=\.|$)", "*", m["rest"])


def kind_tail(kind: str) -> str:
    """A linear kind's last named part, ``_proj`` dropped: ``self_attn.q_proj`` → ``q``; an expert index (``*``)
    is not a name, so ``mlp.experts.gate_up.*`` → ``gate_up``."""
    return [p for p in kind.split(".") if p != "*"][-1].removesuffix("_proj")


def kind_label(path: str) -> str:
    """A linear's short label in a layer's row: ``kind_tail`` of its kind, expert linears marked with their index
    (``model.layers.0.mlp.experts.3.gate_proj`` → ``experts.gate[3]``, ``….experts.gate_up.3`` →
    ``experts.gate_up[3]``)."""
    kind = split_path(path)[1]
    if "experts" not in kind.split("."):
        return kind_tail(kind)
    index = [p for p in path.split("experts.", 1)[1].split(".") if p.isdigit()]
    return f"experts.{kind_tail(kind)}" + (f"[{index[0]}]" if index else "")


def kind_order(kinds) -> list[str]:
    """Linear kinds in a decoder layer's order: the attention's first, a linearized layer's own projections (GLA's
    gate_proj, Mamba's dt_proj) among them (they sorted among the MLP's, self_attn.gate_proj beside mlp.gate_proj,
    or after mlp.down_proj), then the rest in ``_ORDER``."""
    def key(k):
        tail, block = kind_tail(k), k.split(".")[0]
        attention = "attn" in block or "attention" in block
        return (not attention, _ORDER.index(tail) if tail in _ORDER else len(_ORDER), k)

    return sorted(set(kinds), key=key)


@dataclass
class PerLayer:
    """A metric per (linear kind, decoder layer); several modules of one cell (experts) are averaged in
    ``series`` (the plots), kept one by one in ``modules`` (the report's ranges, means and lowest values)."""

    name: str
    cells: dict = field(default_factory=dict)  # kind -> {layer: [values]}
    modules: dict = field(default_factory=dict)  # path -> value, every module

    def add(self, path: str, value: float) -> None:
        layer, kind = split_path(path)
        self.modules[path] = num(value)
        if layer is not None:
            self.cells.setdefault(kind, {}).setdefault(layer, []).append(num(value))

    @property
    def outside(self) -> dict[str, float]:
        """``{path: value}`` of the modules outside the decoder layers (lm_head ...)."""
        return {p: v for p, v in self.modules.items() if split_path(p)[0] is None}

    def in_layer(self, layer: int) -> dict[str, float]:
        """``{label: value}`` of every module of decoder layer ``layer`` (an expert's label names its index)."""
        return {(kind_label(p) if "experts" in p.split(".") else split_path(p)[1]): v
                for p, v in self.modules.items() if split_path(p)[0] == layer}

    def series(self) -> dict[str, dict[int, float]]:
        """``{kind: {layer: mean value}}`` in canonical kind order."""
        return {k: {i: mean(v) for i, v in sorted(self.cells[k].items())} for k in kind_order(self.cells)}

    def layers(self) -> list[int]:
        return sorted({i for per in self.cells.values() for i in per})

    def __bool__(self):
        return bool(self.cells or self.outside)


def quant_facts(stage: dict) -> Optional[dict]:
    """Per-linear SQNR (every quantize stage) and relative output error (calibrated methods), the bit
    allocation if one was made."""
    layers = stage.get("metrics", {}).get("layers")
    if not isinstance(layers, dict) or not any(isinstance(v, dict) and "sqnr_db" in v for v in layers.values()):
        return None
    sqnr, out_err = PerLayer("SQNR (dB)"), PerLayer("relative output error")
    for path, m in layers.items():
        if path.startswith("_") or not isinstance(m, dict):
            continue
        if m.get("sqnr_db") is not None:  # None: an all-zero weight
            sqnr.add(path, m["sqnr_db"])
        if "out_err_rel" in m:
            out_err.add(path, m["out_err_rel"])
    return {"sqnr": sqnr, "out_err": out_err, "allocation": layers.get("_allocation")}


def bits_facts(modules: dict[str, tuple[float, str]]) -> PerLayer:
    """Bits per weight (codes, scales, zeros, outliers) per module; ``modules``: path → (bits, format)."""
    bits = PerLayer("bits per weight")
    for path, (b, _) in modules.items():
        bits.add(path, b)
    return bits


def expert_facts(stage: dict) -> Optional[dict]:
    """Per MoE block: experts before / removed / protected and routing counts (expert-level methods), or
    neurons removed per expert (HEAPr)."""
    metrics = stage.get("metrics", {})
    if stage.get("kind") != "moe" or not isinstance(metrics.get("layers"), dict):
        return None
    shapes = stage.get("shapes", {})
    blocks = []
    for path, r in metrics["layers"].items():
        layer, _ = split_path(path + ".x")
        sizes = shapes.get(path, {}).get("sizes", [])
        entry = {"path": path, "layer": layer, "super": metrics.get("super_experts", {}).get(path, [])}
        if "removed_per_expert" in r:  # HEAPr: neurons
            removed = r["removed_per_expert"]
            entry.update(unit="neurons", before=[s + k for s, k in zip(sizes, removed)], removed_per_expert=removed,
                         error=r.get("est_error"))
        else:
            freq = r.get("frequency", [])
            n = len(freq) or len(sizes) + len(r.get("removed", []))
            entry.update(unit="experts", experts=n, removed=sorted(r.get("removed", [])),
                         skipped_protected=r.get("skipped_protected", []), frequency=freq)
        blocks.append(entry)
    blocks.sort(key=lambda b: (b["layer"] is None, b["layer"] or 0, b["path"]))
    return {"blocks": blocks, "params": metrics.get("expert_params", {})}


def kv_facts(stage: dict, model_config: dict) -> Optional[dict]:
    """Share of each layer's (and KV head's) K and V cache a policy keeps beyond what every token keeps
    (its recent window / residual), at the model's full context where a policy keeps a token count."""
    if stage.get("kind") != "kv":
        return None
    cfg, metrics = stage.get("config", {}), stage.get("metrics", {})
    n_layers = int(model_config.get("num_hidden_layers", 0))
    n_heads = int(model_config.get("num_key_value_heads") or model_config.get("num_attention_heads") or 1)
    context = int(model_config.get("max_position_embeddings") or 0)
    method = stage.get("method", "").removeprefix("kv-")
    heads = None
    if method == "mustafar":
        k, v = 1 - cfg["k_sparsity"], 1 - cfg["v_sparsity"]
        what = f"share of K / V entries kept (magnitude pruning per token) beyond the last {cfg['window']} tokens"
    elif method in ("streaming", "h2o", "a2sf"):
        if cfg.get("budget"):
            k = v = min(1.0, cfg["budget"] / context) if context else float("nan")
            what = f"{cfg['budget']} tokens kept of the model's {context}-token context"
        else:
            k = v = 1 - cfg["ratio"]
            what = "share of tokens kept (eviction)"
    elif method == "kivi":
        k = v = cfg["bits"] / 16
        what = f"{cfg['bits']}-bit codes vs float16 (scales not counted) beyond the last {cfg['residual']} tokens"
    elif method == "cskv":
        width = metrics.get("width")
        k = metrics["k_rank"] / width if width else 1 - cfg["k_ratio"]
        v = metrics["v_rank"] / width if width else 1 - cfg["v_ratio"]
        what = f"channels kept (low-rank K / V) beyond the last {cfg['window']} tokens"
    elif method == "duo" and cfg.get("heads"):
        heads = [[c == "1" for c in row] for row in cfg["heads"]]
        n_layers, n_heads = len(heads), len(heads[0])
        stream = min(1.0, (cfg["sinks"] + cfg["window"]) / context) if context else 0.0
        grid = [[1.0 if h else stream for h in row] for row in heads]
        what = (f"retrieval heads keep the full cache, streaming heads {cfg['sinks']} sinks + {cfg['window']} "
                f"recent tokens (share at the model's {context}-token context)")
        return {"method": method, "policy": metrics.get("policy", method), "what": what,
                "k": [mean(r) for r in grid], "v": [mean(r) for r in grid], "heads": heads,
                "gates": metrics.get("gates"), "head_share": grid}
    else:
        return {"method": method, "policy": metrics.get("policy", method), "what": "no per-layer share", "k": [],
                "v": []}
    return {"method": method, "policy": metrics.get("policy", method), "what": what, "k": [k] * n_layers,
            "v": [v] * n_layers, "heads": heads, "n_heads": n_heads}


def linearize_facts(stage: dict) -> Optional[dict]:
    """Per-layer layout (softmax kept / linear) and stage-1 attention-transfer error; stage-2 KL curve."""
    if stage.get("kind") != "linearize":
        return None
    metrics = stage.get("metrics", {})
    errors = {int(k): num(v) for k, v in metrics.get("transfer_rel_mse", {}).items()}
    tune = metrics.get("finetune", {})
    curve = [num(v) for v in tune.get("kl_curve", [])]
    steps = tune.get("steps")  # (the curve keeps every max(1, steps // 20)-th step's KL: distill.finetune)
    every = max(1, steps // 20) if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 1
    return {"layout": list(stage.get("layout", [])), "transfer": errors, "kl_curve": curve,
            "kl_steps": [1 + i * every for i in range(len(curve))], "finetune": tune}


def linear_window(config) -> str:
    """A linearize stage's sliding-window softmax inside each linear layer, in words: ``window 64`` or ``no window``
    (pure linear attention)."""
    window = config.get("window") if isinstance(config, dict) else None
    if not isinstance(window, int) or isinstance(window, bool):
        return "window ?"
    return f"window {window}" if window else "no window"


def softmax_layers(stage: dict) -> Optional[list[int]]:
    """The layers a linearize stage kept as softmax attention, from its layout; None for other stages (or a layout a
    hand-edited manifest broke)."""
    layout = stage.get("layout")
    if stage.get("kind") != "linearize" or not isinstance(layout, list):
        return None
    return [i for i, kind in enumerate(layout) if kind == "softmax"]


def attention_layout(stage: dict) -> Optional[str]:
    """Which layers a linearize stage runs as linear attention and which kept softmax: "28 linear (hedgehog, window
    64), 2 softmax (layers 3, 17)"; None for other stages. The counts alone did not say which layers a hybrid kept."""
    softmax = softmax_layers(stage)
    if softmax is None:
        return None
    student = f"{str(stage.get('method')).removeprefix('linearize-')}, {linear_window(stage.get('config'))}"
    out = f"{len(stage['layout']) - len(softmax)} linear ({student})"
    if softmax:
        out += f", {len(softmax)} softmax (layer{'s' if len(softmax) > 1 else ''} {', '.join(map(str, softmax))})"
    return out


def transfer_means(errors: dict, layout: list, show) -> str:
    """Stage-1 transfer error averaged per kind of layer, each mean as ``show(mean)`` gives it: "0.97 over the linear
    layers, 10.1 over the softmax ones kept". --keep-softmax keeps the layers it measured worst, so one mean over all
    layers (182.5 % where the linear ones averaged 97 %) was not the error of those that run linear attention."""
    kinds: dict[str, list[float]] = {}
    missing: Counter = Counter()
    for i, kind in enumerate(layout):
        e = num(errors.get(i, errors.get(str(i))))
        if e == e:  # (not NaN)
            kinds.setdefault(kind, []).append(e)
        else:  # (a layer without a measurement: said, so that the mean is not read as every layer's)
            missing[kind] += 1
    words = {"linear": "over the linear layers", "softmax": "over the softmax ones kept"}
    return ", ".join(f"{show(mean(kinds[k]))} {words.get(k, 'over the ' + k + ' ones')}"
                     + (f" ({missing[k]} not measured)" if missing[k] else "") for k in sorted(kinds))


def moefy_facts(stage: dict) -> Optional[dict]:
    """Per-layer MLP relative error and router/oracle agreement of a dense → MoE conversion."""
    if stage.get("method") != "moefy":
        return None
    rows = {split_path(p + ".x")[0]: r for p, r in stage.get("metrics", {}).items()
            if not p.startswith("_") and isinstance(r, dict)}
    return {"error": {i: r.get("mlp_rel_error") for i, r in rows.items() if i is not None},
            "agreement": {i: r.get("router_oracle_agreement") for i, r in rows.items() if i is not None},
            "summary": stage.get("metrics", {}).get("_summary", {})}
