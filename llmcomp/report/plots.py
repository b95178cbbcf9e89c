"""PNG plots of report facts (``facts.py``), drawn with matplotlib's Agg canvas.

matplotlib is optional (``pip install matplotlib``, extra ``report``); ``require_matplotlib`` raises
``ImportError`` when it is missing. Figures are built with the object API on a ``FigureCanvasAgg`` — no
pyplot, so no global backend is switched in the caller's process.
"""
from __future__ import annotations

import math
from pathlib import Path

from llmcomp.report.facts import PerLayer

DPI = 120


def require_matplotlib() -> None:
    import matplotlib  # noqa: F401


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes.ravel().tolist()


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    return path


def _width(n_layers: int) -> float:
    return min(24.0, max(7.0, 3.0 + 0.3 * n_layers))


def _layer_axis(ax, layers) -> None:
    ax.set_xlabel("decoder layer")
    step = max(1, math.ceil(len(layers) / 30))
    ax.set_xticks(list(layers)[::step])
    ax.grid(alpha=0.3)


def errors(sqnr: PerLayer, out_err: PerLayer, title: str, path: Path) -> Path:
    """One line per linear kind across the decoder layers: SQNR in dB (top), relative output error
    (bottom, log scale, calibrated methods only)."""
    panels = [p for p in (sqnr, out_err) if p.cells]
    layers = sorted(set(sqnr.layers()) | set(out_err.layers()))
    fig, axes = _figure(_width(len(layers)), 3.2 * len(panels), nrows=len(panels), sharex=True)
    for ax, panel in zip(axes, panels):
        for kind, per in panel.series().items():
            ax.plot(list(per), list(per.values()), marker="o", markersize=3, linewidth=1, label=kind)
        ax.set_ylabel(panel.name)
        if panel is out_err:
            ax.set_yscale("log")
        _layer_axis(ax, layers)
    for ax in axes[:-1]:
        ax.set_xlabel("")
    axes[0].legend(fontsize=7, ncols=min(4, len(sqnr.cells or out_err.cells)), loc="best")
    axes[0].set_title(f"{title}\nper-linear error: higher SQNR, lower output error are better", fontsize=9)
    return _save(fig, path)


def bits(per: PerLayer, title: str, path: Path) -> Path:
    """Heatmap: linear kind × decoder layer, colour and number = bits per weight (scales included)."""
    series = per.series()
    layers, kinds = per.layers(), list(series)
    grid = [[series[k].get(i, math.nan) for i in layers] for k in kinds]
    values = [v for row in grid for v in row if not math.isnan(v)]
    lo, hi = min(values), max(values)
    fig, (ax,) = _figure(_width(len(layers)), 1.2 + 0.45 * len(kinds))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(2.0, lo), vmax=max(8.0, hi))
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("decoder layer")
    if len(layers) * len(kinds) <= 400:
        for r, row in enumerate(grid):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < (min(2.0, lo) + max(8.0, hi)) / 2 else "black")
    fig.colorbar(im, ax=ax, label="bits / weight")
    ax.set_title(f"{title} — bits per weight per linear (min {lo:.2f}, max {hi:.2f})", fontsize=10)
    return _save(fig, path)


def experts(facts: dict, title: str, path: Path) -> Path:
    """MoE blocks: kept / removed per layer (left); per expert, routing share with removed experts
    crossed and protected super experts starred (right) — or, for HEAPr, neurons removed per expert."""
    blocks = facts["blocks"]
    labels = [str(b["layer"]) if b["layer"] is not None else b["path"] for b in blocks]
    neurons = blocks[0]["unit"] == "neurons"
    width = max(len(b["before"]) if neurons else b["experts"] for b in blocks)
    fig, (left, right) = _figure(min(20.0, 7.0 + 0.35 * width), max(3.0, 1.6 + 0.4 * len(blocks)), ncols=2,
                                 width_ratios=[1, 2])
    if neurons:
        removed = [sum(b["removed_per_expert"]) for b in blocks]
        total = [sum(b["before"]) for b in blocks]
        grid = [[r / max(n, 1) for r, n in zip(b["removed_per_expert"], b["before"])] for b in blocks]
        cbar = "neurons removed"
    else:
        removed = [len(b["removed"]) for b in blocks]
        total = [b["experts"] for b in blocks]
        grid = [[f / max(sum(b["frequency"]), 1) for f in b["frequency"]] or [math.nan] * b["experts"]
                for b in blocks]
        cbar = "routed token share"
    grid = [row + [math.nan] * (width - len(row)) for row in grid]
    y = range(len(blocks))
    left.barh(y, [t - r for t, r in zip(total, removed)], color="tab:blue", label="kept")
    left.barh(y, removed, left=[t - r for t, r in zip(total, removed)], color="tab:red", label="removed")
    left.set_yticks(list(y), labels)
    left.invert_yaxis()
    left.set_ylabel("decoder layer")
    left.set_xlabel(facts["blocks"][0]["unit"])
    left.legend(fontsize=7)
    im = right.imshow(grid, aspect="auto", cmap="Greens" if not neurons else "Reds")
    right.set_yticks(list(y), labels)
    right.set_xticks(range(width), range(width), fontsize=7)
    right.set_xlabel("expert")
    if not neurons:
        for r, b in enumerate(blocks):
            for e in b["removed"]:
                right.text(e, r, "×", ha="center", va="center", color="red", fontsize=12, fontweight="bold")
            for e in b["super"]:
                right.scatter([e], [r], marker="*", s=90, color="gold", edgecolors="black", linewidths=0.5)
    fig.colorbar(im, ax=right, label=cbar)
    removed_share = facts.get("params", {}).get("removed_fraction")
    extra = f", {100 * removed_share:.1f} % of expert parameters removed" if removed_share is not None else ""
    fig.suptitle(f"{title}\nMoE {facts['blocks'][0]['unit']} kept / removed{extra}"
                 + ("" if neurons else "; right: routing on calibration text, × removed, ★ super expert"),
                 fontsize=9)
    return _save(fig, path)


def kv(facts: dict, title: str, path: Path) -> Path:
    """KV policy: share of the K and V cache each layer keeps (bars); DuoAttention: the head mask."""
    heads = facts.get("heads")
    layers = list(range(len(facts["k"])))
    fig, axes = _figure(_width(len(layers)) + (4 if heads else 0), 3.4, ncols=2 if heads else 1,
                        **({"width_ratios": [2, 1]} if heads else {}))
    ax = axes[0]
    ax.bar([i - 0.2 for i in layers], facts["k"], width=0.4, label="K", color="tab:blue")
    ax.bar([i + 0.2 for i in layers], facts["v"], width=0.4, label="V", color="tab:orange")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of the cache kept")
    _layer_axis(ax, layers)
    ax.legend(fontsize=7)
    ax.set_title(f"{title} — {facts['policy']}\n{facts['what']}", fontsize=9)
    if heads:
        hm = axes[1]
        hm.imshow([[1.0 if h else 0.0 for h in row] for row in heads], aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
        hm.set_xlabel("KV head")
        hm.set_ylabel("decoder layer")
        hm.set_xticks(range(len(heads[0])))
        hm.set_yticks(layers[::max(1, math.ceil(len(layers) / 30))])
        gates = facts.get("gates")
        if gates and len(layers) * len(heads[0]) <= 400:
            for r, row in enumerate(gates):
                for c, g in enumerate(row):
                    hm.text(c, r, f"{g:.2f}", ha="center", va="center", fontsize=6)
        n_ret = sum(sum(row) for row in heads)
        hm.set_title(f"retrieval (red, {n_ret}) / streaming (blue) heads"
                     + ("\nnumbers: calibrated gates" if gates else ""), fontsize=9)
    return _save(fig, path)


def per_layer_bars(values: dict[int, float], title: str, ylabel: str, path: Path, *, colors=None, legend=None,
                   curve=None, curve_label=None, curve_x=None) -> Path:
    """Bars per decoder layer (log scale when they span > 2 decades), optional colours + legend, and an
    optional second panel with a curve (e.g. the fine-tuning KL) at the steps ``curve_x`` (default 1, 2, ...)."""
    layers = sorted(values)
    fig, axes = _figure(_width(len(layers)) + (4 if curve else 0), 3.4, ncols=2 if curve else 1,
                        **({"width_ratios": [2, 1]} if curve else {}))
    ax = axes[0]
    ax.bar(layers, [values[i] for i in layers], color=[colors[i] for i in layers] if colors else "tab:blue")
    positive = [v for v in values.values() if v and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    _layer_axis(ax, layers)
    if legend:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=lbl) for lbl, c in legend.items()], fontsize=7)
    ax.set_title(title, fontsize=9)
    if curve:
        axes[1].plot(curve_x or range(1, len(curve) + 1), curve, marker="o", markersize=2)
        axes[1].set_xlabel("fine-tuning step")
        axes[1].xaxis.get_major_locator().set_params(integer=True)
        axes[1].set_ylabel(curve_label or "")
        axes[1].grid(alpha=0.3)
    return _save(fig, path)
