"""``llmcomp check``: the regression gate. Recompute an artifact's tracked metrics and compare them with
a baseline file; a metric worse than its tolerance fails the check.

Baseline file (JSON, edit tolerances freely)::

    {"llmcomp_check": 1,
     "settings": {"windows": 8, "seq_len": 512},
     "metrics": {"ppl": {"value": 24.3, "better": "lower", "tolerance_rel": 0.005}, ...}}
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from xml.sax.saxutils import quoteattr

from llmcomp.errors import UserError, require_int

CHECK_VERSION = 1
# metric → (direction, default relative tolerance)
TRACKED = {
    "ppl": ("lower", 0.005),
    "bits_per_weight": ("lower", 0.0),
    "size_mb": ("lower", 0.01),
}


@dataclass
class Outcome:
    metric: str
    baseline: float
    current: float
    tolerance_rel: float
    better: str

    @property
    def change_rel(self) -> float:
        if self.baseline:
            return (self.current - self.baseline) / abs(self.baseline)
        return 0.0 if self.current == self.baseline else math.copysign(math.inf, self.current)  # from a baseline 0

    @property
    def passed(self) -> bool:
        if math.isnan(self.current):  # (against a baseline of 0 its change took NaN's sign bit: +inf or -inf)
            return False
        worse = self.change_rel if self.better == "lower" else -self.change_rel
        return worse <= self.tolerance_rel + 1e-12


def measure(evaluate, artifact: str, settings: dict, progress=None) -> dict:
    """Run ``evaluate`` (api.evaluate) with the baseline's settings and keep the tracked metrics."""
    kwargs = {"n_windows": settings["windows"], "seq_len": settings["seq_len"]}
    if progress is not None:
        kwargs["progress"] = progress
    start = time.perf_counter()
    result = evaluate(artifact, **kwargs)
    metrics = {k: float(result[k]) for k in TRACKED if k in result}
    metrics["_wall_time_s"] = round(time.perf_counter() - start, 2)
    metrics["_text"] = result.get("text")
    return metrics


def make_baseline(metrics: dict, settings: dict, previous: Optional[dict] = None) -> dict:
    """A baseline of ``metrics``; each metric keeps its tolerance from ``previous`` (a baseline being rewritten by
    --update, where tolerances are edited by hand) or takes the default."""
    bad = [k for k in TRACKED if k in metrics and not math.isfinite(metrics[k])]
    if bad:  # (a NaN model; or no linear layer to count bits over)
        raise UserError(f"The measured {bad[0]} is {metrics[bad[0]]}; a baseline needs finite values.")
    kept = (previous or {}).get("metrics", {})
    return {
        "llmcomp_check": CHECK_VERSION,
        "settings": {**settings, "text": metrics.get("_text")},  # (the text the ppl was measured on)
        "metrics": {k: {"value": metrics[k], "better": TRACKED[k][0],
                        "tolerance_rel": kept.get(k, {}).get("tolerance_rel", TRACKED[k][1])}
                    for k in TRACKED if k in metrics},
    }


def _real(x) -> float:
    """A JSON number as a float; NaN for anything else, a bool or an integer past float's range included."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return math.nan
    try:
        return float(x)
    except OverflowError:
        return math.nan


def looks_like_baseline(path: Path) -> bool:
    """Whether ``path`` is a JSON object marked as an llmcomp check baseline (of any version, whatever its metrics):
    one that ``check --update`` may replace when it cannot be read as one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and "llmcomp_check" in data


def read_baseline(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"Baseline {path} does not exist; create it with --update.")
    if path.is_dir():
        raise UserError(f"Baseline {path} is a directory; give the baseline JSON file (--baseline).")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # (nested past any baseline; a huge int)
        why = ("holds an integer too long to read (Python reads at most 4300 digits)" if "digits" in str(exc)
               else "is not valid JSON")
        raise UserError(f"Baseline {path} {why}.") from None
    if not isinstance(data, dict) or data.get("llmcomp_check") != CHECK_VERSION or "metrics" not in data:
        raise UserError(f"Baseline {path} is not an llmcomp check baseline (version {CHECK_VERSION}).")
    if not isinstance(data["metrics"], dict) or not data["metrics"]:
        raise UserError(f"Baseline {path}: metrics must be a non-empty object of name -> {{value, better, "
                        "tolerance_rel}} (a baseline checking nothing always passes).")
    for name, m in data["metrics"].items():
        if name not in TRACKED:  # (before the evaluation, not after it)
            raise UserError(f"Baseline {path}: metric {name!r} is not measured by this llmcomp (it measures "
                            f"{', '.join(TRACKED)}).")
        value = m.get("value") if isinstance(m, dict) else None
        if not math.isfinite(_real(value)) or m.get("better") not in ("lower", "higher"):
            raise UserError(f"Baseline {path}: metric {name!r} needs a finite numeric value and better=lower|higher.")
        tol = m.get("tolerance_rel", 0.0)
        if not _real(tol) >= 0:  # (NaN too)
            raise UserError(f"Baseline {path}: metric {name!r} has tolerance_rel {str(tol)[:40]}; give a number ≥ 0.")
    settings = data.setdefault("settings", {})
    if not isinstance(settings, dict):
        raise UserError(f"Baseline {path}: settings must be an object such as {{\"windows\": 8, \"seq_len\": 512}}.")
    settings.setdefault("windows", 8)
    settings.setdefault("seq_len", 512)
    check_settings(settings, f"Baseline {path}: settings")
    return data


def check_settings(settings: dict, where: str) -> None:
    """windows ≥ 1 and seq_len ≥ 2, as integers (a baseline's or --update's)."""
    for key, low in (("windows", 1), ("seq_len", 2)):
        require_int(key, settings.get(key), low, f"{where}: ")


def check_text(baseline: dict, text: Optional[str]) -> None:
    """The baseline's ppl was measured on one text (its settings say which, since baselines record it); another
    (LLMCOMP_TEXT, or auto's fallback where the Austen package cannot be fetched) passed or failed silently."""
    want = baseline.get("settings", {}).get("text")
    if want is not None and text is not None and text != want:
        raise UserError(f"The baseline's perplexity was measured on the {want} text, this run's is on the {text} "
                        f"text; set LLMCOMP_TEXT={want} or re-create the baseline with --update.")


def compare(baseline: dict, current: dict) -> list[Outcome]:
    check_text(baseline, current.get("_text"))
    out = []
    for name, m in baseline["metrics"].items():
        if name.startswith("_") or name not in current:  # (_wall_time_s, _text: not metrics)
            raise UserError(f"Metric {name!r} in the baseline is not measured by this llmcomp.")
        out.append(Outcome(name, float(m["value"]), current[name], float(m.get("tolerance_rel", 0.0)), m["better"]))
    return out


def _xml_chars(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold (control characters in a path made the report
    unreadable)."""
    return "".join(c if c in "\t\n\r" or "\x20" <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
                   or "\U00010000" <= c <= "\U0010ffff" else "\ufffd" for c in text)


def junit_xml(outcomes: list[Outcome], artifact: str, seconds: float) -> str:
    failures = sum(not o.passed for o in outcomes)
    cases = []
    for o in outcomes:
        message = f"{o.metric} regressed {100 * o.change_rel:+.3f}% (tolerance {100 * o.tolerance_rel:.3f}%)"
        body = "" if o.passed else f"<failure message={quoteattr(message)}/>"
        cases.append(f'  <testcase classname="llmcomp.check" name={quoteattr(o.metric)}>{body}</testcase>')
    suite = quoteattr(_xml_chars(f"llmcomp check {artifact}"))
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name={suite} '
            f'tests="{len(outcomes)}" failures="{failures}" time="{seconds:.2f}">\n' + "\n".join(cases) + "\n</testsuite>\n")
