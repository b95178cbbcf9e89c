"""``llmcomp prune kv``: record a KV-cache policy (calibrated where the method needs it) in an artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.lists import int_list
from llmcomp.cli.pathflag import path_option
from llmcomp.core.config import dumps
from llmcomp.errors import FieldError, UserError

# flag → the methods it applies to (anything else given is an error, not silently ignored)
FLAGS = {
    "ratio": ("mustafar", "streaming", "h2o", "a2sf", "duo", "cskv"),
    "k_ratio": ("mustafar", "cskv"), "v_ratio": ("mustafar", "cskv"),
    "budget": ("streaming", "h2o", "a2sf"), "sinks": ("streaming", "duo"), "recent": ("h2o", "a2sf"),
    "forget": ("a2sf",), "window": ("mustafar", "kivi", "duo", "cskv"), "bits": ("kivi",), "group": ("kivi",),
    "calib_samples": ("duo", "cskv"), "seq_len": ("duo", "cskv"), "weights_only": ("cskv",),
}


def build_kv_policy(method: str, **flags):
    """The policy config for ``method`` from the CLI flags that were given (None = not given)."""
    from llmcomp.prune.kv import load_policies

    methods = load_policies()
    cls = methods.get(method)  # unknown method → UserError listing the known ones
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    for name in given:
        if method not in FLAGS[name]:
            raise UserError(f"--{name.replace('_', '-')} does not apply to --method {method} "
                            f"(it applies to {', '.join(FLAGS[name])}).")
    if given.get("budget", 1) < 1:  # (0 would mean "no budget" below, and fall back to --ratio unsaid)
        raise UserError(f"--budget is a number of tokens to keep, at least 1; got {given['budget']} "
                        "(leave it out to evict by --ratio).")
    if "budget" in given and "ratio" in given:  # (--ratio was dropped, and the manifest recorded it)
        raise UserError("--budget and --ratio both size the cache (a number of tokens kept, a fraction evicted); "
                        "give one.")
    ratio = given.get("ratio")
    fields = {
        "mustafar": {"k_sparsity": given.get("k_ratio", ratio), "v_sparsity": given.get("v_ratio", ratio),
                     "window": given.get("window")},
        "kivi": {"bits": given.get("bits"), "group": given.get("group"), "residual": given.get("window")},
        "streaming": {"ratio": ratio, "budget": given.get("budget"), "sinks": given.get("sinks")},
        "h2o": {"ratio": ratio, "budget": given.get("budget"), "recent": given.get("recent")},
        "a2sf": {"ratio": ratio, "budget": given.get("budget"), "recent": given.get("recent"),
                 "forget": given.get("forget")},
        "duo": {"streaming": ratio, "sinks": given.get("sinks"), "window": given.get("window"),
                "calib_steps": given.get("calib_samples"), "calib_seq_len": given.get("seq_len")},
        "cskv": {"k_ratio": given.get("k_ratio", ratio), "v_ratio": given.get("v_ratio", ratio),
                 "window": given.get("window"), "calib_samples": given.get("calib_samples"),
                 "calib_seq_len": given.get("seq_len"),
                 "activation_aware": False if given.get("weights_only") else None},
    }[method]
    try:
        policy = cls(**{k: v for k, v in fields.items() if v is not None})
    except UserError as e:  # the policy's checks name its fields; say which flag instead
        field, _, rest = (e.field, None, e.tail) if isinstance(e, FieldError) else str(e).partition(" ")
        if field not in fields:
            raise
        raise UserError(f"{_flag(field, given)} {rest}") from None
    idle = [f"--{n.replace('_', '-')}" for n in ("calib_samples", "seq_len") if n in given]
    if idle and not getattr(policy, "calibrated_on_text", True):  # (they went into the manifest, unused)
        why = "with --weights-only" if given.get("weights_only") else "when it removes nothing (--ratio 0)"
        raise UserError(f"{' and '.join(idle)} do{'es' if len(idle) == 1 else ''} not apply: --method {method} "
                        f"calibrates on no text {why}.")
    return policy


def _flag(field: str, given: dict) -> str:
    """The command-line flag a policy field was set from (build_kv_policy's table, read backwards)."""
    if field in ("k_sparsity", "k_ratio", "v_sparsity", "v_ratio"):
        own = field[0] + "_ratio"
        name = own if own in given else "ratio"
    else:
        name = {"streaming": "ratio", "calib_steps": "calib_samples", "calib_seq_len": "seq_len",
                "residual": "window"}.get(field, field)
    return "--" + name.replace("_", "-")


def kv(
    model: Annotated[Optional[str], typer.Argument(help="Model directory or llmcomp artifact (default: the bundled SmolLM2-135M-Instruct).")] = None,
    output: Annotated[Path, path_option("--output", "-o", help="Artifact directory to write.")] = Path("llmcomp-kv"),
    method: Annotated[str, typer.Option(help="mustafar | kivi | streaming | h2o | a2sf | duo | cskv.")] = "mustafar",
    ratio: Annotated[Optional[float], typer.Option(help="Fraction removed, in [0, 1): sparsity (mustafar), evicted tokens (streaming/h2o/a2sf), streaming heads (duo), removed channels (cskv). Default 0.5.")] = None,
    k_ratio: Annotated[Optional[float], typer.Option(help="mustafar/cskv: the ratio for keys only.")] = None,
    v_ratio: Annotated[Optional[float], typer.Option(help="mustafar/cskv: the ratio for values only.")] = None,
    budget: Annotated[Optional[int], typer.Option(help="streaming/h2o/a2sf: keep this many tokens (instead of --ratio).")] = None,
    window: Annotated[Optional[int], typer.Option(help="Recent tokens kept dense / full precision (mustafar 32, kivi residual 128, cskv 32) or the streaming heads' window (duo 64).")] = None,
    sinks: Annotated[Optional[int], typer.Option(help="streaming/duo: first tokens always kept (attention sinks; default 4 / 16).")] = None,
    recent: Annotated[Optional[float], typer.Option(help="h2o/a2sf: fraction of the budget kept for the most recent tokens (default 0.5).")] = None,
    forget: Annotated[Optional[float], typer.Option(help="a2sf: forgetting factor in (0, 1] (default 0.99).")] = None,
    bits: Annotated[Optional[int], typer.Option(help="kivi: bits per cached value (2, 3, 4 or 8; default 2).")] = None,
    group: Annotated[Optional[int], typer.Option(help="kivi: values per scale (tokens for keys, channels for values; default 32).")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="duo: optimization steps (one passkey sequence each); cskv: calibration windows (default 16 each).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="duo/cskv: calibration sequence length in tokens (default 768 / 512).")] = None,
    weights_only: Annotated[bool, typer.Option("--weights-only", help="cskv: bases from the k/v projection weights (no calibration text).")] = False,
    device: Annotated[Optional[str], typer.Option(help="Device for calibration (default: cuda if available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store tensors as float32, float16 or bfloat16 (default: as in the model).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """Record a KV-cache policy in an artifact; llmcomp.load + generate then applies it."""
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.app import _quiet_transformers, run

    _quiet_transformers()

    def go():
        policy = build_kv_policy(method, ratio=ratio, k_ratio=k_ratio, v_ratio=v_ratio, budget=budget, window=window,
                                 sinks=sinks, recent=recent, forget=forget, bits=bits, group=group,
                                 calib_samples=calib_samples, seq_len=seq_len, weights_only=weights_only)
        with render.RichProgress() as progress:
            path = api.prune_kv(policy, output, model, overwrite=overwrite, device=device, dtype=dtype,
                                progress=progress)
        render.wrote(f"{path} ({policy.describe()})")

    run(go)


def eval_long(targets, *, windows: int, context: int, passkey_lengths: str, passkey_samples: int, device, compare: bool,
              json_out, needle_keys: int = 0) -> None:
    """``llmcomp eval --long``: one row per model (its KV policy active), printed as one table."""

    from llmcomp import api
    from llmcomp.cli import render

    lengths = int_list(passkey_lengths, "--passkey-lengths", "1024,2048", allow_empty=True)
    api.check_long(context, windows, lengths, passkey_samples, needle_keys)  # (then every model's policy, not
    for p in targets:                                                          # after the earlier evaluations)
        api.check_long_fit(p, context, lengths, passkey_samples)
    with render.RichProgress() as progress:
        rows = [api.evaluate_long(p, context=context, n_windows=windows, passkey_lengths=lengths,
                                  passkey_samples=passkey_samples, needle_keys=needle_keys, device=device,
                                  progress=progress) for p in targets]
    render.console.print(render.long_table(rows, compare))
    if json_out:
        from llmcomp.core.paths import write_report

        write_report(json_out, dumps(rows, indent=1))
