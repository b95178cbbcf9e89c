"""The ``llmcomp`` command line (typer). Every command makes one call into ``llmcomp.api``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.pathflag import path_option
from llmcomp.core.config import dumps
from llmcomp.errors import UserError

app = typer.Typer(
    name="llmcomp",
    help="Compress and convert large language models into one verified safetensors artifact.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(given: bool) -> None:
    if given:  # (the packages' metadata, not their imports: torch alone takes seconds to import)
        from importlib.metadata import PackageNotFoundError, version

        from llmcomp import __version__

        def of(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        typer.echo(f"llmcomp {__version__} (torch {of('torch')}, transformers {of('transformers')}, "
                   f"accelerate {of('accelerate')}, safetensors {of('safetensors')})")
        raise typer.Exit()


VERSION_HELP = "Print llmcomp's version and its main dependencies'."


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help=VERSION_HELP)] = False):
    pass


# --device-map / --max-memory / --offload-folder help, shared by the commands that load a model to run it
PLACE_HELP = {
    "device_map": "Place the model with accelerate: auto (layers over GPU, CPU and disk under --max-memory), cpu, cuda or cuda:N. Replaces --device.",
    "max_memory": "Weights budget per device for --device-map auto (implied), e.g. cuda:0=2GiB,cpu=24GiB; units B/KB/MB/GB/KiB/MiB/GiB. Unnamed devices keep accelerate's defaults; GPU entries are ignored where no GPU is visible.",
    "offload_folder": "Directory for the layers that fit neither the GPU nor the CPU budget (disk offload; implies --device-map auto).",
}


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def run(fn, writes: bool = True):
    """Run ``fn`` translating user errors into one red line and exit code 2. ``writes``: the command writes an
    output (atomically), so a failure can say nothing was written at its destination."""
    from llmcomp.cli import render
    from llmcomp.core.paths import PUBLISHED

    opened = len(_resume().OPENED) if _resume() is not None else 0
    published = len(PUBLISHED)

    def tail() -> str:  # (a stop after the output was published, e.g. during the summary line: it is complete)
        done = PUBLISHED[published:]
        return f"; {done[-1]} had been written in full" if done else (
            "; nothing was written at the destination" if writes else "")

    try:
        result = fn()
    except UserError as exc:
        render.error(_as_flag(exc))
        _kept_work(opened)
        raise typer.Exit(2)
    except OSError as exc:  # the machine, not the program: disk full, permissions, a path through a file
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        render.error(f"{exc.strerror or exc}{where}{tail()}.")
        _kept_work(opened)
        raise typer.Exit(2)
    except KeyboardInterrupt as exc:
        from llmcomp.cli import Terminated

        terminated = isinstance(exc, Terminated)
        render.error(f"{'terminated' if terminated else 'interrupted'}{tail()}.")
        _kept_work(opened)
        raise typer.Exit(143 if terminated else 130)
    from llmcomp.cli import finished

    finished()
    return result


def _as_flag(exc: UserError) -> str:
    """A config field's type error (``ExpertPruneConfig.ratio must be a number, got nan``) by the command's flag of
    that name where it has one (``--ratio must be …``); any other error as it is."""
    try:  # (typer ≥ 0.2x runs commands under its own copy of click)
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context

    from llmcomp.errors import FieldError

    ctx = get_current_context(silent=True)
    flag = "--" + exc.field.replace("_", "-") if isinstance(exc, FieldError) else None
    if flag is not None and ctx is not None and any(flag in p.opts for p in ctx.command.params):
        return f"{flag} {exc.tail}"
    return str(exc)


def _resume():
    """``llmcomp.core.resume`` where a job has loaded it (only calibrated jobs make resume directories)."""
    import sys

    return sys.modules.get("llmcomp.core.resume")


def _check_baseline_window(model, baseline: Path, seq_len: int) -> None:
    """A baseline whose windows are longer than the model's context: said as the baseline's setting (the evaluation
    asked for a shorter --seq-len, which a check refuses: the baseline's settings run)."""
    from llmcomp.api import context_limit
    from llmcomp.core.model import read_path

    limit = context_limit(read_path(model))  # (0 for a damaged config: the evaluation reports it)
    if limit and seq_len > limit:
        raise UserError(f"{baseline} measures windows of {seq_len} tokens (its settings.seq_len), longer than the "
                        f"model's context ({limit} tokens); write it again with --update --seq-len N (N ≤ {limit}).")


def last_stage(path) -> dict:
    """The last stage of the manifest a command just wrote, for its summary line: read, not verified again (hashing
    the weights once more took seconds on big models, and an interrupt then read as if nothing was written)."""
    from llmcomp.core.artifact import read_manifest

    return read_manifest(path, verify=False)["stages"][-1]


def _kept_work(opened: int) -> None:
    """After a calibrated job stopped: where its finished work waits (it stayed for good, unnamed)."""
    from llmcomp.cli import render

    resume = _resume()
    for d in resume.unfinished(opened) if resume is not None else ():
        render.wrote(f"the work done so far is kept in {d}: run the same command again to resume from it, or "
                     "delete it", label="note:")


# quantize's options that a --preset replaces (build_quant_config keeps only --target/--ignore of them)
PRESET_REPLACES = ("method", "bits", "group_size", "symmetric", "fp4_format", "act_order", "damp", "rounds",
                   "candidates", "sensitivity", "act_bits", "act_format", "search", "outliers", "vector_len",
                   "hadamard")


def _given(ctx: typer.Context, names) -> list[str]:
    """The options among ``names`` that the command line set (not their defaults), as their flags."""
    params = {p.name: p for p in ctx.command.params}
    # (by the source's name: typer may carry a click of its own, whose enum is another class)
    return ["/".join(params[n].opts + params[n].secondary_opts) for n in names
            if n in params and getattr(ctx.get_parameter_source(n), "name", None) in ("COMMANDLINE", "ENVIRONMENT")]


def _note_kv_not_applied(paths, agreement: bool = False) -> None:
    """eval's and check's perplexity (and KL / top-1 against a reference) are the dense attention's for an artifact
    with a KV-cache policy, while the greedy prefix is generated with the cache, the policy applied: a note each."""
    from llmcomp.cli import render

    scored = "perplexity, KL and top-1 score" if agreement else "perplexity scores"
    greedy = " (the greedy prefix, generated with the cache, applies it)" if agreement else ""
    for p in filter(_holds_kv_policy, paths):
        render.wrote(f"{scored} each window without a cache, so the KV-cache policy of {p} is not applied{greedy}; "
                     "llmcomp eval --long measures it", label="note:")


def _holds_kv_policy(path: Optional[str]) -> bool:
    from llmcomp.core.artifact import is_artifact, read_manifest, stage_kinds
    from llmcomp.core.model import resolve

    p = None if path is None else resolve(path)
    return p is not None and is_artifact(p) and "kv" in stage_kinds(read_manifest(p, verify=False))


def ignore_patterns(given: Optional[list[str]]) -> tuple[str, ...]:
    """--ignore's patterns: lm_head besides those given (typer replaces a list default, and `--ignore down_proj`
    then quantized the head — for a tied model, the embedding matrix), none of its own where one of them is ''."""
    given = list(given or [])
    if "" in given:
        return tuple(p for p in given if p)
    return ("lm_head", *dict.fromkeys(p for p in given if p != "lm_head"))


@app.command()
def quantize(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="Model directory or llmcomp artifact (default: the bundled SmolLM2-135M-Instruct).")] = None,
    output: Annotated[Path, path_option("--output", "-o", help="Artifact directory to write.")] = Path("llmcomp-out"),
    method: Annotated[str, typer.Option(help="Quantization method.")] = "rtn",
    bits: Annotated[float, typer.Option(help="Bits per weight code (2-8); a fractional value (e.g. 2.5) is an average budget with per-layer bit allocation. vptq/pvq: index bits per weight, e.g. 2, 2.25, 3, 3.25.")] = 4,
    group_size: Annotated[int, typer.Option(help="Weights per scale along the input dimension; 0 = per-channel. A ragged last group is used when it does not divide the layer.")] = 128,
    symmetric: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid (no zero point) or asymmetric.")] = False,
    fp4_format: Annotated[Optional[str], typer.Option("--format", help=(
        "--method fp4 or gptq (GPTQ on the FP4 grid): mxfp4 (E2M1, E8M0 scale per 32), nvfp4 (E2M1, E4M3 "
        "scale per 16 and an FP32 tensor scale) or fp4 (E2M1, float16 scale per --group-size). Without it: "
        "mxfp4 for --method fp4, the integer grid for gptq."
    ))] = None,
    preset: Annotated[Optional[str], typer.Option(help="Named preset that sets the method and its settings, e.g. w4g128 (its settings' own flags are refused beside it).")] = None,
    targets: Annotated[list[str], typer.Option("--target", help="Layers to quantize: class name, path suffix or re:regex.")] = ["Linear"],
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help="Layers to skip (same patterns), besides lm_head, which is always skipped unless one of them is '' (then only the ones given are).")] = None,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help=(
        "GPTQ/decoupleQ/vptq/pvq: quantize columns by decreasing Hessian diagonal (static groups, no "
        "permutation stored)."
    ))] = True,
    damp: Annotated[float, typer.Option(help=(
        "GPTQ/decoupleQ/vptq/pvq (and --sensitivity output): Hessian dampening, a fraction of its mean "
        "diagonal."
    ))] = 0.01,
    rounds: Annotated[int, typer.Option(help="decoupleQ: integer/float alternation rounds.")] = 4,
    candidates: Annotated[str, typer.Option(help="Bit allocation: candidate widths, comma-separated.")] = "2,3,4,8",
    sensitivity: Annotated[Optional[str], typer.Option(help="Bit allocation: how a layer's rounding error is scored — fisher (default: its effect on the model's loss; one forward+backward of the whole model per sample) or output (the layer's own output error; layer by layer, bounded memory).")] = None,
    act_bits: Annotated[int, typer.Option("--act-bits", help="--method fp4 or rtn: 4 also rounds each layer's inputs per token (W4A4, with per-channel input scales folded into the weights); 16 = weights only.")] = 16,
    act_format: Annotated[Optional[str], typer.Option("--act-format", help="W4A4 activation element: fp (E2M1; default for --method fp4) or int (INT4 ±7; default for rtn).")] = None,
    search: Annotated[bool, typer.Option("--search", help="--method fp4 --format fp4: per-layer LLM-FP4 search of the 4-bit element (E2M1/E1M2/E3M0) and clipping on calibration data.")] = False,
    outliers: Annotated[Optional[str], typer.Option(help="GPTQ: keep this share of the weights (those whose rounding costs most) in fp16, e.g. 0.5% or 0.005. vptq: this share of the input columns (most salient) gets a codebook of its own.")] = None,
    vector_len: Annotated[Optional[int], typer.Option("--vector-len", help="--method vptq: weights per vector along the input dimension (default 4); pvq: weights per group down a column (default 64). --bits is then the code bits per weight.")] = None,
    hadamard: Annotated[bool, typer.Option("--hadamard", help="--method pvq: rotate the weights by a seeded random Hadamard matrix first (undone at dequantize).")] = False,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows (calibrated methods).")] = 128,
    seq_len: Annotated[int, typer.Option(help="Calibration window length in tokens.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed for calibration sampling.")] = 0,
    calib_batch: Annotated[int, typer.Option(help="Calibration windows per forward pass; lower it when a layer's activations do not fit in GPU memory.")] = 8,
    device: Annotated[Optional[str], typer.Option(help="Device for calibrated work (default: cuda if available).")] = None,
    max_memory: Annotated[Optional[str], typer.Option(help="Hard cap on this job's GPU memory, e.g. cuda:0=2GiB (the model stays in CPU memory; one decoder layer at a time goes to the GPU); a run that does not fit stops naming the layer. A cpu=SIZE entry is checked against the model's size. GPU entries are ignored where no GPU is visible.")] = None,
    offload_folder: Annotated[Optional[Path], path_option(help="Not supported by quantize (the model stays in CPU memory); accepted only to say so. See eval/load.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Store unquantized tensors as float32, float16 or bfloat16 (default: as in the model).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
):
    """Quantize a model's linear layers and write an artifact."""
    _quiet_transformers()
    from llmcomp import api
    from llmcomp.cli import render
    from llmcomp.cli.methods import build_quant_config, unused_options

    def go():
        config, allocation = build_quant_config(
            method=method, bits=bits, group_size=group_size, symmetric=symmetric, preset=preset,
            targets=tuple(targets), ignore=ignore_patterns(ignore), act_order=act_order, damp=damp, rounds=rounds,
            candidates=candidates, sensitivity=sensitivity, fp4_format=fp4_format, outliers=outliers, search=search, act_bits=act_bits,
            act_format=act_format,
            vector_len=vector_len, hadamard=hadamard, group_given=bool(_given(ctx, ["group_size"])))
        replaced = _given(ctx, PRESET_REPLACES) if preset is not None else []  # (a known preset: checked above)
        if replaced:
            raise UserError(f"--preset {preset} sets the method and its settings itself; drop {', '.join(replaced)} "
                            "or drop --preset.")
        for name, why in (unused_options(method, bits, fp4_format, sensitivity) if preset is None else {}).items():
            given = _given(ctx, [name])  # (a flag the method does not read is an error, not silently dropped)
            if given:
                raise UserError(f"{given[0]} does not apply here: {why}.")
        from llmcomp.quant import METHODS

        calib = dict(calib_samples=calib_samples, calib_seq_len=seq_len, seed=seed, calib_batch=calib_batch)
        if allocation is None and not METHODS.get(config.method)(config).needs_calibration:
            idle = _given(ctx, ["calib_samples", "seq_len", "seed", "calib_batch"])  # (taken, ignored: no calibration)
            if idle:
                raise UserError(f"{idle[0]} does not apply here: --method {config.method} with these settings "
                                "reads no calibration text.")
            if _given(ctx, ["device"]):  # (taken and ignored: the layers are rounded where they are, on the CPU)
                raise UserError(f"--device does not apply here: --method {config.method} with these settings rounds "
                                "each layer on the CPU, with no calibration pass to run on a device.")
            calib = {}  # (the library refuses calibration settings where nothing calibrates)
        with render.RichProgress() as progress:
            path = api.quantize(config, output, model, overwrite=overwrite, device=device, dtype=dtype,
                                allocation=allocation, max_memory=max_memory, offload_folder=offload_folder,
                                progress=progress, **calib)
        render.wrote(path)

    run(go)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    paths: Annotated[Optional[list[str]], typer.Argument(help="Model directories or artifacts (default: the bundled model).")] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Show Δppl against the first path.")] = False,
    windows: Annotated[int, typer.Option(help="Number of held-out windows.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    device: Annotated[Optional[str], typer.Option(help="Device (default: cuda if available).")] = None,
    device_map: Annotated[Optional[str], typer.Option(help=PLACE_HELP["device_map"])] = None,
    max_memory: Annotated[Optional[str], typer.Option(help=PLACE_HELP["max_memory"])] = None,
    offload_folder: Annotated[Optional[Path], path_option(help=PLACE_HELP["offload_folder"])] = None,
    reference: Annotated[Optional[str], typer.Option(help="Original model to compare against (KL divergence, top-1 agreement, greedy common prefix); 'base' = the base model in the first artifact's manifest.")] = None,
    json_out: Annotated[Optional[Path], path_option("--json", help="Also write the results as JSON here.")] = None,
    record: Annotated[bool, typer.Option("--record", help="Append each artifact's results to its manifest (evaluations).")] = False,
    long: Annotated[bool, typer.Option("--long", help="Long-context evaluation with each model's KV-cache policy active: continuation ppl over a compressed prefix, KV bytes held, passkey retrieval.")] = False,
    context: Annotated[int, typer.Option(help="--long: tokens per window (the first 3/4 are prefilled into the cache, the rest scored).")] = 2048,
    passkey_lengths: Annotated[str, typer.Option(help="--long: passkey prompt lengths in tokens, comma-separated.")] = "1024,2048",
    passkey_samples: Annotated[int, typer.Option(help="--long: passkey prompts per length (0 = none).")] = 10,
    needle_keys: Annotated[int, typer.Option(help="--long: also multi-key needle retrieval with this many labelled needles per prompt (0 = none), same lengths and prompt count as the passkey.")] = 0,
):
    """Perplexity on held-out text, bits per weight and size; several paths print one table."""
    _quiet_transformers()
    from llmcomp import api
    from llmcomp.cli import render

    def go():
        api.check_eval(seq_len, windows, batch_size)
        if long and (reference is not None or record):  # (before --reference base's own checks)
            raise UserError("--reference and --record apply to perplexity eval; --long reports its own metrics "
                            "(write them with --json).")
        from llmcomp.core.paths import check_report, write_report

        from llmcomp.core.artifact import is_artifact, read_manifest
        from llmcomp.core.model import check_model_path, check_weights, read_path

        # (before the evaluation, not after it; the bundled model and the base a manifest names are read too)
        reads = [read_path(p) for p in paths or [None]]
        # (a mistyped or damaged later path was found after the earlier models' evaluations: minutes)
        seen: dict = {}
        for p, r in zip(paths or [], reads):
            folder = check_model_path(p)  # (None: the bundled model, converted at its load)
            if is_artifact(r):  # (the load's checks before the weights: the manifest, its seal, the files it names)
                read_manifest(r, hashes=False)
            elif folder is not None:  # (a plain folder: its weights are there)
                check_weights(folder)
            first = seen.get(r.resolve())
            if first is not None:  # (evaluated twice, its row shown twice; --record appended its results twice)
                raise UserError(f"{p} is given twice; evaluate each model once." if first == p else
                                f"{first} and {p} are the same model; evaluate each model once.")
            seen[r.resolve()] = p

        plain = [p for p, r in zip(paths or [None], reads) if not is_artifact(r)]
        # (--reference base: the first artifact's base; a plain model first was taken as its own reference)
        based = next((p for p in paths or [] if p not in plain), None)
        if reference == "base":
            if based is None:
                raise UserError("--reference base compares with the base model an artifact's manifest names, and no "
                                "path given is an llmcomp artifact; pass --reference PATH.")
            reads.append(api.recorded_base(based))
        elif reference is not None:
            reads.append(read_path(reference))
        check_report(json_out, "--json", reads=reads)
        from llmcomp.core.memory import resolve_placement

        resolve_placement(device, device_map, max_memory, offload_folder)  # bad flags fail before any load
        place = {"device": device, "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        if long and (device_map or max_memory or offload_folder):
            raise UserError("--device-map, --max-memory and --offload-folder apply to perplexity eval; --long runs "
                            "the model on one --device.")
        if record and not long:  # (a plain model directory has no manifest to append to)
            if len(plain) == len(paths or [None]):
                raise UserError("--record appends to artifacts' manifests, and no path given is an artifact.")
            from llmcomp.core.artifact import MANIFEST
            from llmcomp.core.paths import unwritable

            for r in reads:
                why = is_artifact(r) and unwritable(r / MANIFEST)  # (found after the evaluation: a read-only mount)
                if why:
                    raise UserError(f"--record appends to {r / MANIFEST}, which cannot be written: {why}.")
        # (each was taken and ignored by the other evaluation)
        stray = _given(ctx, ["seq_len", "batch_size"] if long else
                       ["context", "passkey_lengths", "passkey_samples", "needle_keys"])
        if stray:
            what = "perplexity eval, not --long (whose windows are --context long)" if long else "--long eval only"
            raise UserError(f"{stray[0]} applies to {what}.")
        if long and passkey_samples == 0 and _given(ctx, ["passkey_lengths"]):  # (taken and ignored: no prompts)
            raise UserError("--passkey-lengths applies with --passkey-samples ≥ 1 (0 runs no passkey prompts).")
        if long:
            from llmcomp.cli.prune_kv import eval_long

            return eval_long(paths or [None], windows=windows, context=context, passkey_lengths=passkey_lengths,
                             passkey_samples=passkey_samples, device=device, compare=compare, json_out=json_out,
                             needle_keys=needle_keys)
        rows = []
        targets = paths or [None]
        ref_path = None
        if reference is not None:
            ref_path = api.base_model_path(based) if reference == "base" else reference
            api.check_reference_tokenizer(ref_path, targets)
        with render.RichProgress() as progress:
            ref = None
            if ref_path is not None:
                ref = api.record_reference(ref_path, seq_len=seq_len, n_windows=windows, batch_size=batch_size,
                                           progress=progress, **place)
            for p in targets:
                rows.append(api.evaluate(p, seq_len=seq_len, n_windows=windows, batch_size=batch_size,
                                         reference=ref, progress=progress, **place))
        render.console.print(render.eval_table(rows, compare, asked=windows))
        _note_kv_not_applied(targets, agreement=ref is not None)
        if json_out:
            write_report(json_out, dumps(rows, indent=1))
        if record:
            api.record_evaluations(rows)
            for p in plain:
                render.wrote(f"{p or 'the bundled model'} is not an artifact: --record skipped it", label="note:")

    run(go, writes=False)  # (--json and --record write small files in place)


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="Artifact directory (or model directory).")],
    json_: Annotated[bool, typer.Option("--json", help="Print the raw manifest as JSON.")] = False,
):
    """Verify an artifact's hashes and show its manifest: base model, stages, formats, files."""
    from llmcomp import api
    from llmcomp.cli import render

    def go():
        manifest = api.inspect(path)
        if json_:
            sys.stdout.write(dumps(manifest, indent=1) + "\n")
            return
        for t in render.manifest_tables(manifest):
            render.console.print(t)

    run(go, writes=False)


@app.command()
def check(
    ctx: typer.Context,
    artifact: Annotated[str, typer.Argument(help="Artifact (or model directory) to check.")],
    baseline: Annotated[Path, path_option(help="Baseline JSON with metric values and tolerances.")] = Path("llmcomp-baseline.json"),
    update: Annotated[bool, typer.Option("--update", help="Measure and (re)write the baseline instead of checking.")] = False,
    windows: Annotated[int, typer.Option(help="Held-out windows when writing a baseline (rewriting one: its own unless given).")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per window when writing a baseline (rewriting one: its own unless given).")] = 512,
    json_out: Annotated[Optional[Path], path_option("--json", help="Write the comparison as JSON here.")] = None,
    junit: Annotated[Optional[Path], path_option(help="Write a JUnit XML report here (for CI dashboards).")] = None,
):
    """Regression gate: recompute ppl, bits/weight and size; exit 1 if one is worse than the baseline allows."""
    _quiet_transformers()
    from llmcomp import api
    from llmcomp import check as chk
    from llmcomp.cli import render

    def go():
        from llmcomp.core.model import check_model_path
        from llmcomp.core.paths import check_report, write_report

        check_model_path(artifact)  # the artifact named first is reported first
        # (each was taken and ignored: --update writes only the baseline, and a check runs the baseline's settings)
        stray = _given(ctx, ["json_out", "junit"] if update else ["windows", "seq_len"])
        if stray:
            raise UserError(f"{stray[0]} applies {'to a check, not to --update' if update else 'with --update only'}.")
        from llmcomp.core.model import read_path

        reads, writes = [read_path(artifact)] if update else [read_path(artifact), baseline], {}
        for path, flag in ((json_out, "--json"), (junit, "--junit"), (baseline if update else None, "--baseline")):
            check_report(path, flag, reads, writes)  # before the measurement, not after it
            writes[path] = flag  # (and not where another of its reports goes)
        if update:
            settings = {"windows": windows, "seq_len": seq_len}
            chk.check_settings(settings, "--windows / --seq-len")
            previous, unreadable = None, None
            if baseline.is_file():  # its hand-edited tolerances carry over; a damaged baseline is replaced
                try:
                    previous = chk.read_baseline(baseline)
                except UserError as e:
                    if not chk.looks_like_baseline(baseline):  # (a mistyped --baseline replaced any file, rc 0)
                        raise UserError(f"{e} --update replaces only a baseline; remove the file first or give "
                                        "another --baseline path.") from None
                    unreadable = f"{e} Replacing it (default tolerances)."
            if previous is not None:  # so do its settings, where no flag changes them
                given = _given(ctx, ["windows", "seq_len"])
                settings = {k: settings[k] if f"--{k.replace('_', '-')}" in given else previous["settings"][k]
                            for k in settings}
        else:
            from llmcomp.core.data import corpus

            base = chk.read_baseline(baseline)
            settings = base["settings"]
            chk.check_text(base, corpus().name)  # (before the measurement)
            _check_baseline_window(artifact, baseline, settings["seq_len"])
        with render.RichProgress() as progress:
            if update and (previous or unreadable):
                progress.note(unreadable or f"Keeping the tolerances of {baseline}; measuring at {settings['windows']} "
                              f"windows × {settings['seq_len']} tokens.")
            current = chk.measure(api.evaluate, artifact, settings, progress)
        _note_kv_not_applied([artifact])  # (a CI gate on a KV artifact never saw its policy)
        if update:
            write_report(baseline, json.dumps(chk.make_baseline(current, settings, previous), indent=1) + "\n")
            render.wrote(baseline, "wrote baseline")
            return 0
        outcomes = chk.compare(base, current)
        render.console.print(render.check_table(outcomes, current["_wall_time_s"]))
        if json_out:
            write_report(json_out, dumps({"artifact": artifact, "passed": all(o.passed for o in outcomes),
                                          "metrics": [{**o.__dict__, "passed": o.passed, "change_rel": o.change_rel}
                                                      for o in outcomes]}, indent=1))
        if junit:
            write_report(junit, chk.junit_xml(outcomes, artifact, current["_wall_time_s"]))
        return 0 if all(o.passed for o in outcomes) else 1

    code = run(go, writes=False)
    raise typer.Exit(code or 0)


from llmcomp.cli.prune import prune_app  # noqa: E402

app.add_typer(prune_app, name="prune")

from llmcomp.cli.convert import convert_app  # noqa: E402

app.add_typer(convert_app, name="convert")

from llmcomp.cli.bench import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")

from llmcomp.cli.export import export as _export  # noqa: E402

app.command("export")(_export)


from llmcomp.cli.linearize import linearize as _linearize  # noqa: E402

app.command("linearize")(_linearize)

from llmcomp.cli.report import report as _report  # noqa: E402

app.command("report")(_report)

