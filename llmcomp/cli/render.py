"""The only module that prints: rich console, progress bars, tables."""
from __future__ import annotations

import math
import threading
import time
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from llmcomp.core.progress import Progress

console = Console()
if not console.is_terminal:  # pipes and CI logs: wide enough that tables are not truncated
    console = Console(width=160)
err_console = Console(stderr=True)


class RichProgress(Progress):
    """Renders library progress as rich bars on stderr. Where stderr is not a terminal (CI logs, ``nohup``,
    a pipe) rich draws the bars only when the job ends, so a long job would print nothing for minutes:
    there each task is a plain line instead, every ``interval`` seconds while it runs and once when done."""

    interval = 30.0  # seconds between a running task's plain lines

    def __init__(self):
        self.plain = not err_console.is_terminal
        if self.plain:
            self._tasks: dict[int, list] = {}  # id → [description, total, completed, start, finished]
            self._lock = threading.Lock()
            self._stop = threading.Event()
            self._ticker: Optional[threading.Thread] = None
            return
        self.bar = RichBar(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                           MofNCompleteColumn(), TimeElapsedColumn(), console=err_console, transient=False)

    def __enter__(self):
        if self.plain:
            self._ticker = threading.Thread(target=self._tick, name="llmcomp-progress", daemon=True)
            self._ticker.start()
            return self
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.plain:
            self._stop.set()
            if self._ticker is not None:
                self._ticker.join()
            return None
        if not self.bar.tasks:  # nothing was drawn: leave no blank line behind (e.g. before an error)
            self.bar.live.transient = True
        return self.bar.__exit__(*exc)

    def task(self, description, total):
        if not self.plain:
            return self.bar.add_task(description, total=total)
        with self._lock:
            tid = len(self._tasks)
            self._tasks[tid] = [description, total, 0, time.monotonic(), False]
        return tid

    def advance(self, task, n=1):
        if not self.plain:
            self.bar.advance(task, n)
            return
        with self._lock:
            self._tasks[task][2] += n

    def done(self, task):
        if not self.plain:
            self.bar.refresh()
            return
        with self._lock:  # lines are printed under the lock: a tick never follows its task's last line
            entry = self._tasks[task]
            if not entry[4]:
                entry[4] = True
                self._line(entry)

    def note(self, message):
        console = err_console if self.plain else self.bar.console
        console.print(f"[dim]{escape(str(message))}[/dim]")

    def _tick(self):
        while not self._stop.wait(self.interval):
            with self._lock:
                for entry in self._tasks.values():
                    if not entry[4]:
                        self._line(entry, running=True)

    @staticmethod
    def _line(entry, running=False):
        description, total, completed, start, _ = entry
        count = f"{completed}/{total}" if total is not None else str(completed)
        elapsed = _clock(time.monotonic() - start)
        if running:
            state = f"{count} … {elapsed} so far"
        elif total is not None and completed < total:  # a task left early: an error or an interrupt follows
            state = f"stopped at {count} after {elapsed}"
        else:
            state = f"{count} in {elapsed}"
        err_console.print(f"{description} {state}", markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


ERRORS_SHOWN = []  # (cli.main: an exit 130 with none shown was an interrupt typer took silently)


def error(message: str) -> None:
    ERRORS_SHOWN.append(message)
    err_console.print(f"[bold red]error:[/bold red] {escape(str(message))}", highlight=False, soft_wrap=True)


def wrote(what: str, label: str = "wrote") -> None:
    """``wrote PATH (details)``: the path and details are the user's text, not rich markup (a path may hold
    brackets)."""
    console.print(f"[green]{label}[/green] {escape(str(what))}", highlight=False, soft_wrap=True)


def add_row(table: Table, *cells) -> None:
    """A table row of plain text: model names, paths and config values are not read as rich markup."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def number(v, digits=2) -> str:
    """A metric from a manifest for a line of text: null (a NaN, as strict JSON writes it) as nan."""
    return "nan" if v is None else f"{v:.{digits}f}"


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
    same = comparable(rows, "seq_len")
    for r, ok in zip(rows, same):
        cells = [r["name"], r["stages"], _fmt(r["ppl"]), _fmt(r["bits_per_weight"]), _fmt(r.get("size_mb", float("nan")), 1),
                 _fmt(r["eval_time_s"], 1), _fmt(r.get("quant_time_s", float("nan")), 1)]
        if compare:
            cells.insert(3, f"{100 * (r['ppl'] / base - 1):+.1f}" if ok else "-")
        if agreement:
            cells[3 + compare:3 + compare] = [f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.3f}",
                                              f"{100 * r['top1_agree']:.1f}", f"{r['greedy_prefix']:.1f}"]
        add_row(table, *cells)
    if rows:
        counts = sorted({r["windows"] for r in rows}, reverse=True)
        held = (f" (all the held-out text holds; {asked} asked)" if asked is not None and counts[-1] < asked
                else "")
        table.caption = (f"{rows[0]['text']} text, {' / '.join(map(str, counts))} windows{held} × "
                         f"{rows[0]['seq_len']} tokens, no BOS; bits/weight over decoder linears"
                         + (f"; KLD = KL(reference ‖ model) per token, reference {rows[0].get('reference') or '-'}, "
                            f"greedy prefix of 32 new tokens over {rows[0].get('greedy_prompts', 8)} prompts"
                            if agreement else "")
                         + (NOT_COMPARED if compare and not all(same) else ""))
    return table


NOT_COMPARED = ("; Δppl - : another tokenizer or other windows than the first row's, whose per-token perplexities do "
                "not compare")


def comparable(rows: list[dict], length: str) -> list[bool]:
    """Per row: whether its perplexity compares with the first row's (--compare's Δppl): the same tokenizer (another
    one's per-token perplexity is of other tokens) and the same windows of the same ``length`` key's tokens."""
    def key(r):
        return r.get("tokenizer"), r["windows"], r[length]

    return [key(r) == key(rows[0]) for r in rows]


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
    same = comparable(rows, "context")
    for r, ok in zip(rows, same):
        cells = [r["name"], r["policy"], _fmt(r["ppl"], 3)]
        if compare:
            cells.append(f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}" if ok else "-")
        cells += [_fmt(r["kv_bytes"] / 1e6, 1), f"{100 * r['kv_bytes'] / r['kv_dense_bytes']:.1f}"]  # (MB as size)
        cells += [f"{r['passkey'].get(n, float('nan')):.2f}" for n in lengths]
        cells += [f"{r.get('multikey', {}).get(n, float('nan')):.2f}" for n in multi] + [_fmt(r["eval_time_s"], 1)]
        add_row(table, *cells)
    if rows:
        r = rows[0]
        table.caption = (f"{r['text']} text, {r['windows']} windows × {r['context']} tokens: {r['prefix']} prefilled "
                         f"into the cache, the rest scored in chunks of {r['chunk']}; KV bytes held after the prefix; "
                         f"passkey: {r.get('passkey_samples', 0)} greedy prompts per length"
                         + (f"; {r['needle_keys']}-key: as many labelled needles per prompt, one asked"
                            if multi else "")
                         + (NOT_COMPARED if compare and not all(same) else ""))
    return table


EVALUATION_KEYS = ("ppl", "kld_mean", "top1_agree", "bits_per_weight", "size_mb", "windows", "seq_len", "text")


def manifest_tables(manifest: dict) -> list[Table]:
    from llmcomp.core.artifact import SEAL
    from llmcomp.report.facts import attention_layout, shown_config, stage_bits

    if "stages" not in manifest:
        t = Table(title="model directory")
        for k, v in manifest.items():
            add_row(t, k, str(v))
        return [t]
    head = Table(title="llmcomp artifact", show_header=False)
    base = manifest["base_model"]
    add_row(head, "base model", f"{base.get('name')}  (sha256 {str(base.get('sha256'))[:12]}…)")
    add_row(head, "schema / llmcomp", f"{manifest['schema_version']} / {manifest.get('llmcomp_version', '?')}")
    add_row(head, "text", str(manifest.get("text_source") or "- (no stage read calibration text)"))
    for i, s in enumerate(manifest["stages"], 1):
        cfg = shown_config(s.get("config"))
        metrics = s.get("metrics", {})
        bpw, covers = stage_bits(metrics)  # KV stages: their policy; moefy, experts, linearize: neither
        what = metrics.get("policy") or (f"{bpw} bits/weight{covers}" if bpw is not None else None)
        add_row(head, f"stage {i}", f"{s['method']} in {s.get('wall_time_s')} s{', ' + what if what else ''}; "
                                   f"config {cfg}")
    for layout in filter(None, map(attention_layout, manifest["stages"])):  # (a linearized model's hybrid)
        add_row(head, "attention", layout)
    add_row(head, "files", ", ".join(f"{k} ({v[:8]}…)" for k, v in manifest["files"].items()))
    if SEAL not in manifest:  # (its edits pass unseen, as in artifacts written before the seal)
        add_row(head, "seal", "none: edits to llmcomp.json cannot be detected (re-create the artifact to seal it)")
    for e in manifest.get("evaluations") or []:  # (eval --record's results, shown in report.md only)
        if isinstance(e, dict):
            add_row(head, "evaluation", ", ".join(f"{k} {_fmt(e[k], 4)}" for k in EVALUATION_KEYS if k in e))
    mods = Table(title="quantized modules")
    for c in ("format", "modules", "example"):
        mods.add_column(c)
    groups: dict[str, list[str]] = {}
    for name, spec in manifest["modules"].items():
        key = ", ".join(f"{k}={v}" for k, v in spec.items() if not k.startswith("_"))
        groups.setdefault(f"{spec.get('_type')}({key})", []).append(name)
    for key, names in groups.items():
        add_row(mods, key, str(len(names)), names[0])
    if not groups:  # (a KV policy, an expert pruning, a linearized model: an empty table)
        add_row(head, "quantized modules", "none")
    return [head, mods] if groups else [head]


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
