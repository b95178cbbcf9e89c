"""``llmcomp bench``: performance measurements that print ratios against peers timed in the same run."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcomp.cli.lists import int_list
from llmcomp.cli.pathflag import path_option
from llmcomp.errors import UserError

bench_app = typer.Typer(help="Benchmarks: kernels vs peers, decode speed (GPU).", no_args_is_help=True)


@bench_app.command("kernels")
def kernels(
    ctx: typer.Context,
    out: Annotated[Optional[Path], path_option("--out", "-o", help="Write the JSON result here.")] = None,
    shapes: Annotated[Optional[str], typer.Option(help="Layer shapes N×K, e.g. 4096x4096,14336x4096.")] = None,
    ms: Annotated[str, typer.Option("--ms", help="Batch sizes M.")] = "1,4,16,64,256",
    bits: Annotated[str, typer.Option(help="Bit widths of the uniform format.")] = "4",
    group_size: Annotated[int, typer.Option(help="Group size.")] = 128,
    float_formats: Annotated[str, typer.Option(help="Other formats to time too (mxfp4,nvfp4,fp4,vq2,vq3,pvq2,pvq3), '' for none.")] = "mxfp4,nvfp4",
    fp16: Annotated[bool, typer.Option("--fp16", help="Also time the uniform rows with float16 activations (and fp16 cuBLAS).")] = False,
):
    """Time the dequant-GEMM fast paths against bf16 cuBLAS, torch's int4 tinygemm and bitsandbytes NF4."""
    from llmcomp.cli.app import run

    def go():
        try:
            parsed = [tuple(int(v) for v in s.lower().split("x")) for s in shapes.split(",")] if shapes else None
        except ValueError:
            raise UserError(f"--shapes must look like 4096x4096,14336x4096, got {shapes!r}.") from None
        if parsed is not None and any(len(s) != 2 or min(s) < 1 for s in parsed):
            raise UserError(f"--shapes must look like 4096x4096,14336x4096, got {shapes!r}.")
        m_list = list(int_list(ms, "--ms", "1,4,16"))
        bit_list = int_list(bits, "--bits", "4,3", allow_empty=True)  # (--bits '': the float formats only)
        if min(m_list) < 1:
            raise UserError(f"--ms must be positive integers, e.g. 1,16; got {ms!r}.")
        from llmcomp.core.paths import check_report
        from llmcomp.formats import Uniform

        floats = tuple(f.strip() for f in float_formats.split(",") if f.strip())
        bad = [f for f in floats if f not in ("mxfp4", "nvfp4", "fp4", "vq2", "vq3", "pvq2", "pvq3")]
        if bad:
            raise UserError(f"--float-formats takes mxfp4, nvfp4, fp4, vq2, vq3, pvq2 or pvq3, got {', '.join(bad)}.")
        if not bit_list and not floats:
            raise UserError("--bits and --float-formats are both empty: nothing to time.")
        for b in bit_list:
            Uniform(bits=b, group_size=group_size)  # bad bits / group: its own error line
        if not bit_list:  # (both time the uniform rows only)
            from llmcomp.cli.app import _given

            stray = (["--fp16"] if fp16 else []) + _given(ctx, ["group_size"])
            if stray:
                raise UserError(f"{stray[0]} applies to the uniform rows, and --bits is empty.")
        from llmcomp.eval.kernel_bench import SHAPES, check_shapes

        check_shapes(parsed or SHAPES, [f"w{b}" for b in bit_list] + list(floats), group_size)
        check_report(out, "--out")  # before the GPU run, not after it
        import torch

        if not torch.cuda.is_available():
            raise UserError("llmcomp bench kernels needs a CUDA GPU; none is visible to torch here.")
        import importlib

        try:  # (whether it imports: kernel_bench times with triton.testing)
            importlib.import_module("triton")
        except ImportError:
            raise UserError("llmcomp bench kernels times with triton.testing; install triton.") from None
        from llmcomp.eval import kernel_bench

        kernel_bench.run(parsed or SHAPES, m_list, bit_list, group_size, out and out.expanduser(),
                         float_formats=floats, fp16=fp16)

    run(go, writes=False)


@bench_app.command("decode")
def decode(
    ctx: typer.Context,
    path: Annotated[Optional[str], typer.Argument(help="llmcomp artifact to time (or use --synthetic).")] = None,
    original: Annotated[Optional[str], typer.Option(help="The original model to compare with (default: the base model in the artifact's manifest).")] = None,
    synthetic: Annotated[Optional[str], typer.Option(help="Instead of PATH: a random-weight model of this shape (llama3-8b, or smollm2-135m: the bundled model's), RTN-quantized in memory.")] = None,
    bits: Annotated[int, typer.Option(help="--synthetic: RTN bits.")] = 4,
    group: Annotated[int, typer.Option(help="--synthetic: RTN group size.")] = 128,
    format: Annotated[str, typer.Option("--format", help="--synthetic: uniform (--bits, --group), mxfp4 or nvfp4 (RTN), or vq2 / vq3 (random VQ indices and codebooks: timing only).")] = "uniform",
    batch: Annotated[str, typer.Option(help="Batch sizes (sequences decoded together).")] = "1,16",
    context: Annotated[int, typer.Option(help="Prompt tokens per sequence before the timed steps.")] = 512,
    steps: Annotated[int, typer.Option(help="Timed decode steps.")] = 64,
    layers: Annotated[Optional[int], typer.Option(help="--synthetic: keep only the first N decoder layers (a quick run).")] = None,
    quantize_lm_head: Annotated[bool, typer.Option("--quantize-lm-head", help="--synthetic: quantize lm_head too (kept in the activation dtype by default, as llmcomp quantize does).")] = False,
    dtype: Annotated[str, typer.Option(help="Activation and unquantized-weight dtype: bfloat16 or float16.")] = "bfloat16",
    graphs: Annotated[bool, typer.Option("--graphs/--no-graphs", help="Replay each decode step as a CUDA graph.")] = True,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile each decoder layer of both models first (fuses the ~40 small kernels of HF's eager layer; quantized linears stay opaque ops). Compiling takes minutes on an 8B shape.")] = False,
    trace_linears: Annotated[bool, typer.Option("--trace-linears/--no-trace-linears", help="With --compile: trace each quantized linear as its kernel's one opaque op, so a decoder layer compiles to one graph (default); --no-trace-linears keeps them out of dynamo (a graph break each).")] = True,
    fuse_linears: Annotated[bool, typer.Option("--fuse-linears/--no-fuse-linears", help="With --compile and traced linears: q/k/v and gate/up, which read the same input, run as one kernel call each over their stacked weights (default).")] = True,
    glu: Annotated[Optional[bool], typer.Option("--glu/--no-glu", help="With --compile and fused linears: a uniform- or E2M1-format (mxfp4, nvfp4) gated MLP's gate/up projections and SiLU-mul as one kernel call, the activation in the GEMM's epilogue (default on; without the flag LLMCOMP_GLU=0 turns it off).")] = None,
    norm_split: Annotated[Optional[bool], typer.Option("--norm-split/--no-norm-split", help="With --compile and the GLU call, at most 8 tokens a step (in float16: norms whose weights are within ±1, so that γ ⊙ h cannot overflow): Llama-style layers' RMSNorms split into the epilogues of the kernel calls around them (o and the GLU call; down and the next layer's q/k/v), no norm kernels (default on; without the flag LLMCOMP_NORM_SPLIT=0 turns it off).")] = None,
    pdl: Annotated[bool, typer.Option("--pdl/--no-pdl", help="With --compile: programmatic dependent launch for the step's kernels, the quantized GEMMs, inductor's Triton kernels and the decode attention's together, so each may start while the one before finishes (sm_90+ and a torch that has inductor's option; default on: the W4 8B step 4 % faster on an H200, bench/results/decode_h200_ab_inductor_pdl.json).")] = True,
    pack_gqa: Annotated[bool, typer.Option("--pack-gqa/--no-pack-gqa", help="Both models attend a decode step's grouped-query heads on the cache as it is (no copies of K/V, llmcomp.eval.decode_attention); --no-pack-gqa: transformers' SDPA path.")] = True,
    layers_per_graph: Annotated[int, typer.Option("--layers-per-graph", help="With --compile: consecutive decoder layers compiled as one graph, so the residual add each layer ends with can fuse into the next layer's norm (1: each layer its own graph).")] = 1,
    inductor_option: Annotated[Optional[list[str]], typer.Option("--inductor-option", help="With --compile: an inductor config option for the compiled layers of both models, KEY=VALUE (repeat the flag for more); combo_kernels is on unless set here (combo_kernels=false).")] = None,
    breakdown: Annotated[bool, typer.Option("--breakdown", help="Also profile eager steps: GPU kernel time by kind (quantized linears, dense GEMM, attention, other), kernels a step, the top kernels (in the JSON).")] = False,
    out: Annotated[Optional[Path], path_option("--out", "-o", help="Write the JSON result here.")] = None,
):
    """Decode tokens/s at each batch size: a compressed model vs its original (StaticCache + CUDA graphs)."""
    from llmcomp.cli.app import run

    def go():
        from llmcomp.cli.app import _given
        from llmcomp.eval import decode_bench as db

        batches = list(int_list(batch, "--batch", "1,16"))
        if any(b < 1 for b in batches):  # (int_list: a batch twice timed it twice, one column showing the other's row)
            raise UserError(f"--batch must be positive integers, e.g. 1,16; got {batch!r}.")
        if context < 1 or steps < 1:
            raise UserError("--context and --steps must be ≥ 1.")
        if layers_per_graph < 1:
            raise UserError(f"--layers-per-graph must be ≥ 1, got {layers_per_graph}.")
        if layers_per_graph > 1 and not compile:
            raise UserError("--layers-per-graph applies with --compile only.")
        if inductor_option and not compile:
            raise UserError("--inductor-option applies with --compile only.")
        if glu is not None and not compile:
            raise UserError("--glu / --no-glu apply with --compile only.")
        if norm_split is not None and not compile:
            raise UserError("--norm-split / --no-norm-split apply with --compile only.")
        off = [flag for flag, on in (("--no-trace-linears", trace_linears), ("--no-fuse-linears", fuse_linears),
                                     ("--no-pdl", pdl)) if not on]
        if off and not compile:
            raise UserError(f"{off[0]} applies with --compile only.")
        if (glu is not None or norm_split is not None) and not (trace_linears and fuse_linears):
            raise UserError(f"--glu and --norm-split apply to traced, fused linears; drop them or "
                            f"{off[0]}.")
        if norm_split and not db.glu_enabled(glu):
            raise UserError("--norm-split needs the GLU call (its epilogue takes the norm's second half): drop "
                            "--no-glu / LLMCOMP_GLU=0.")
        try:
            options = db.inductor_options(inductor_option or [])
        except ValueError as exc:
            raise UserError(f"--inductor-option: {exc}.") from None
        if dtype not in ("bfloat16", "float16"):
            raise UserError(f"--dtype must be bfloat16 or float16, got {dtype!r}.")
        if (path is None) == (synthetic is None):
            raise UserError(f"Pass an artifact PATH or --synthetic {'|'.join(db.SYNTHETIC)} (one of the two).")
        if synthetic is not None:
            if synthetic not in db.SYNTHETIC:
                raise UserError(f"--synthetic must be one of: {', '.join(db.SYNTHETIC)}; got {synthetic!r}.")
            if original is not None:
                raise UserError("--original goes with an artifact PATH; --synthetic compares with its own "
                                "unquantized weights.")
            most = db.SYNTHETIC[synthetic]["num_hidden_layers"]
            if layers is not None and not 1 <= layers <= most:  # (1000 built a 1000-layer model: out of memory)
                raise UserError(f"--layers keeps the first N of {synthetic}'s {most} layers: 1 to {most}, got "
                                f"{layers}.")
            from llmcomp.formats import Uniform

            if format not in db.SYNTHETIC_FORMATS:
                raise UserError(f"--format must be one of: {', '.join(db.SYNTHETIC_FORMATS)}; got {format!r}.")
            if format == "uniform":
                Uniform(bits=bits, group_size=group)  # bad bits / group: its own error line
            elif stray := _given(ctx, ["bits", "group"]):
                raise UserError(f"{stray[0]} applies to --format uniform, not {format}.")
            ref = None
        else:
            if layers is not None or format != "uniform" or quantize_lm_head or _given(ctx, ["bits", "group"]):
                raise UserError("--layers, --format, --bits, --group and --quantize-lm-head apply to --synthetic "
                                "models only.")
            ref = _original_of(path, original, weights=False)  # (hashed once a GPU is known to be here)
        from llmcomp.core.paths import check_report

        check_report(out, "--out", reads=[path, ref])  # before the GPU run, not after it
        from llmcomp.api import context_limit  # (read before loading: the synthetic shape's, or the artifact's config)
        from llmcomp.core.model import resolve

        limit = (db.SYNTHETIC[synthetic]["max_position_embeddings"] if synthetic is not None
                 else context_limit(resolve(path)))
        db.check_positions(limit, context, steps)
        import torch

        if not torch.cuda.is_available():
            raise UserError("llmcomp bench decode needs a CUDA GPU; none is visible to torch here.")
        if synthetic is None and original is None:  # (the sha256 of the recorded base's weights: GBs read)
            _original_of(path, None)
        from llmcomp.api import DTYPES
        from llmcomp.cli import render

        settings = {"dtype": dtype, "graphs": graphs}
        with render.RichProgress() as progress:
            if synthetic is not None:
                settings.update(synthetic=synthetic, format=format, bits=bits, group_size=group, layers=layers,
                                lm_head_quantized=quantize_lm_head)
                models = db.synthetic_models(synthetic, bits, group, layers, DTYPES[dtype], progress, format,
                                             quantize_lm_head)
            else:
                settings.update(path=str(path), original=str(ref) if ref else "bundled")
                models = db.artifact_models(path, ref, DTYPES[dtype], progress)
            result = db.run(models, batches, context, steps, settings, out=out and out.expanduser(), graphs=graphs,
                            progress=progress,
                            compile=compile, breakdown=breakdown, frozen=trace_linears,
                            pack_gqa=pack_gqa, fuse=fuse_linears, pdl=pdl,
                            span=layers_per_graph, options=options, glu=glu, norm=norm_split)
        render.console.print(_decode_table(result, batches))

    run(go, writes=False)


def _original_of(path: str, original: Optional[str], weights: bool = True) -> Optional[str]:
    """The model to compare with: ``--original``, else the base model the artifact's manifest names
    (None = the bundled model). Checked here, its weights' sha256 too (``weights``), before anything is loaded."""
    from llmcomp.core import model as model_mod
    from llmcomp.core.artifact import is_artifact, read_manifest

    p = model_mod.resolve(path)
    if not is_artifact(p):
        raise UserError(f"{p} is not an llmcomp artifact (no llmcomp.json); pass an artifact or use --synthetic.")
    manifest = read_manifest(p, verify=False)
    _check_static_cache(p, manifest)
    if original is not None:
        o = model_mod.resolve(original)
        if is_artifact(o):  # (the original was timed first, under a static cache that is no model's either)
            _check_static_cache(o, read_manifest(o, verify=False), "--original ")
        return original
    base = manifest["base_model"]
    # (None where it is the bundled model, converted elsewhere on this machine)
    return model_mod.checked_base(p, base, "--original MODEL", missing_ok=base.get("name") == model_mod.BUNDLED_NAME,
                                  weights=weights)


def _check_static_cache(p, manifest: dict, which: str = "") -> None:
    """Refuse a model whose stages bench decode's static cache cannot run as they are meant to run."""
    from llmcomp.core.artifact import stage_kinds

    kinds = stage_kinds(manifest)
    if "kv" in kinds:  # (decode_speed's StaticCache bypasses KVRuntime: the dense attention would be timed)
        raise UserError(f"{which}{p} holds a KV-cache policy ({kinds['kv']}), which bench decode's static cache "
                        "does not apply; measure the policy with llmcomp eval --long.")
    if "linearize" in kinds:  # (a hybrid's softmax layers decoded wrongly over the static slots)
        raise UserError(f"{which}{p} is linearized ({kinds['linearize']}); bench decode times a static cache, and "
                        "linear attention decodes with its recurrent state (time generate instead).")


def _decode_table(result: dict, batches: list[int]):
    from rich.table import Table

    from llmcomp.cli import render

    settings = result["settings"]
    table = Table(title=f"llmcomp bench decode · {result.get('device', '')} · context {settings['context']}, "
                        f"{settings['steps']} steps" + (", layers compiled" if settings.get("compile") else ""))
    table.add_column("model")
    for b in batches:
        table.add_column(f"tokens/s @ {b}", justify="right")
        table.add_column(f"ms/step @ {b}", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("CUDA graphs")
    for name in ("original", "compressed"):
        rows = {r["batch"]: r for r in result["rows"] if r["model"] == name}
        if not rows:
            continue
        cells = []
        for b in batches:
            r = rows.get(b, {})
            if "tokens_per_s" in r:
                cells += [f"{r['tokens_per_s']:.1f}", f"{r['ms_per_step']:.2f}"]
            else:
                cells += [r.get("error", "-"), "-"]
        ups = result["speedup"] if name == "compressed" else {}
        speed = "  ".join(f"{ups[str(b)]:.2f}× @ {b}" for b in batches if str(b) in ups) or "-"
        graphed = {bool(r.get("graphs")) for r in rows.values() if "tokens_per_s" in r}
        mode = "yes" if graphed == {True} else "no" if graphed == {False} else "partly" if graphed else "-"
        render.add_row(table, next(iter(rows.values()))["label"], *cells, speed, mode)
    return table
