"""The only module that prints: rich console, progress bars, tables."""
from __future__ import annotations

import math
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmcomp.core.progress import Progress

console = Console()
if not console.is_terminal:  # pipes and CI logs: wide enough that tables are not truncated
    console = Console(width=160)
err_console = Console(stderr=True)


class RichProgress(Progress):
    """Renders library progress as rich bars on stderr."""

    def __init__(self):
        self.bar = RichBar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), console=err_console, transient=False)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.bar.tasks:  # nothing was drawn: leave no blank line behind (e.g. before an error)
            self.bar.live.transient = True
        return self.bar.__exit__(*exc)

    def task(self, description, total):
        return self.bar.add_task(description, total=total)

    def advance(self, task, n=1):
        self.bar.advance(task, n)

    def done(self, task):
        self.bar.refresh()

    def note(self, message):
        self.bar.console.print(f"[dim]{message}[/dim]")


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)


def _fmt(v, digits=2):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def eval_table(rows: list[dict], compare: bool, asked: Optional[int] = None) -> Table:
    table = Table(title="llmcomp eval")
    cols = ["model", "stages", "ppl", "bits/weight", "size MB", "eval s", "quant s"]
    if compare:
        cols.insert(3, "Δppl %")
    agreement = "kld_mean" in (rows[0] if rows else {})
    if agreement:
        cols[3 + compare:3 + compare] = ["KLD mean", "KLD p99", "top-1 %", "greedy prefix"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "stages") else "right")
    base = rows[0]["ppl"] if rows else None
    for r in rows:
        cells = [r["name"], r["stages"], _fmt(r["ppl"]), _fmt(r["bits_per_weight"]), _fmt(r.get("size_mb", float("nan")), 1),
                 _fmt(r["eval_time_s"], 1), _fmt(r.get("quant_time_s", float("nan")), 1)]
        if compare:
            cells.insert(3, f"{100 * (r['ppl'] / base - 1):+.1f}")
        if agreement:
            cells[3 + compare:3 + compare] = [f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}",
                                              f"{100 * r['top1_agree']:.1f}", f"{r['greedy_prefix']:.1f}"]
        table.add_row(*cells)
    if rows:
        held = (f" (all the held-out text holds; {asked} asked)" if asked is not None and rows[0]["windows"] < asked
                else "")
        table.caption = (f"{rows[0]['text']} text, {rows[0]['windows']} windows{held} × {rows[0]['seq_len']} tokens, "
                         "no BOS; bits/weight over decoder linears"
                         + ("; KLD = KL(reference ‖ model) per token, greedy prefix of 32 new tokens over 8 prompts"
                            if agreement else ""))
    return table


def long_table(rows: list[dict], compare: bool) -> Table:
    """``eval --long``: continuation ppl with the KV policy active, KV bytes held, passkey accuracy."""
    table = Table(title="llmcomp eval --long")
    lengths = list(rows[0].get("passkey", {})) if rows else []
    multi = list(rows[0].get("multikey", {})) if rows else []
    cols = ["model", "KV policy", "ppl", *(["Δppl %"] if compare else []), "KV MB", "KV % dense",
            *[f"passkey {n}" for n in lengths], *[f"{rows[0]['needle_keys']}-key {n}" for n in multi], "eval s"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "KV policy") else "right")
    base = rows[0] if rows else None
    for r in rows:
        cells = [r["name"], r["policy"], _fmt(r["ppl"], 3)]
        if compare:
            cells.append(f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}")
        cells += [_fmt(r["kv_bytes"] / 2**20, 1), f"{100 * r['kv_bytes'] / r['kv_dense_bytes']:.1f}"]
        cells += [f"{r['passkey'].get(n, float('nan')):.2f}" for n in lengths]
        cells += [f"{r.get('multikey', {}).get(n, float('nan')):.2f}" for n in multi] + [_fmt(r["eval_time_s"], 1)]
        table.add_row(*cells)
    if rows:
        r = rows[0]
        table.caption = (f"{r['text']} text, {r['windows']} windows × {r['context']} tokens: {r['prefix']} prefilled "
                         f"into the cache, the rest scored in chunks of {r['chunk']}; KV bytes held after the prefix; "
                         f"passkey: {r.get('passkey_samples', 0)} greedy prompts per length"
                         + (f"; {r['needle_keys']}-key: as many labelled needles per prompt, one asked" if multi else ""))
    return table


def manifest_tables(manifest: dict) -> list[Table]:
    if "stages" not in manifest:
        t = Table(title="model directory")
        for k, v in manifest.items():
            t.add_row(k, str(v))
        return [t]
    head = Table(title="llmcomp artifact", show_header=False)
    base = manifest["base_model"]
    head.add_row("base model", f"{base.get('name')}  (sha256 {str(base.get('sha256'))[:12]}…)")
    head.add_row("schema / llmcomp", f"{manifest['schema_version']} / {manifest['llmcomp_version']}")
    head.add_row("text", str(manifest.get("text_source")))
    for i, s in enumerate(manifest["stages"], 1):
        cfg = {k: v for k, v in s.get("config", {}).items() if not k.startswith("_")}
        metrics = s.get("metrics", {})
        what = metrics.get("policy") or f"{metrics.get('bits_per_weight')} bits/weight"  # KV stages: the policy
        head.add_row(f"stage {i}", f"{s['method']} in {s.get('wall_time_s')} s, {what}; config {cfg}")
    head.add_row("files", ", ".join(f"{k} ({v[:8]}…)" for k, v in manifest["files"].items()))
    mods = Table(title="quantized modules")
    for c in ("format", "modules", "example"):
        mods.add_column(c)
    groups: dict[str, list[str]] = {}
    for name, spec in manifest["modules"].items():
        key = ", ".join(f"{k}={v}" for k, v in spec.items() if not k.startswith("_"))
        groups.setdefault(f"{spec.get('_type')}({key})", []).append(name)
    for key, names in groups.items():
        mods.add_row(key, str(len(names)), names[0])
    return [head, mods]


def check_table(outcomes, seconds: float) -> Table:
    table = Table(title="llmcomp check")
    for c in ("metric", "baseline", "current", "change %", "tolerance %", "result"):
        table.add_column(c, justify="left" if c in ("metric", "result") else "right")
    for o in outcomes:
        table.add_row(o.metric, _fmt(o.baseline, 4), _fmt(o.current, 4), f"{100 * o.change_rel:+.3f}",
                      f"{100 * o.tolerance_rel:.3f}", "[green]pass[/green]" if o.passed else "[bold red]FAIL[/bold red]")
    failed = sum(not o.passed for o in outcomes)
    table.caption = f"{len(outcomes) - failed} passed, {failed} failed in {seconds:.1f} s"
    return table
