"""Library entry points: the only functions the CLI calls."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

import torch

from llmcomp.core import memory
from llmcomp.core import model as model_mod
from llmcomp.core.artifact import SEAL, is_artifact, load_artifact, read_manifest, stored_dtype, write_artifact
from llmcomp.core.config import from_dict, to_dict
from llmcomp.core.calib import note_equal_batch
from llmcomp.core.data import calib_windows, check_calib, check_vocab, corpus, eval_windows
from llmcomp.core.paths import as_path, check_output, job_lock
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError, require_int
from llmcomp.eval import perplexity, size_report
from llmcomp.eval.agreement import Reference, tokenizer_id
from llmcomp.interop import imports
from llmcomp.prune.kv import hook as _kv_hook  # noqa: F401  (artifacts with a KV stage re-install their policy)
from llmcomp.prune import moe as _moe_hook  # noqa: F401  (artifacts with a moe stage get their shapes back)
from llmcomp.linearize import hook as _linearize_hook  # noqa: F401  (linearize stages re-install their student attention)
from llmcomp.quant import QuantConfig, quantize_model
from llmcomp.quant.allocate import AllocationConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def one_job(fn):
    """Hold ``paths.job_lock`` on the entry point's ``output`` for the whole call (where its folder exists): a
    second job on the same output stops at once. Only calibrated jobs took it (with their resume directory), so
    an RTN quantize wrote over a running GPTQ job's output, which then failed after all its layers."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            output = signature.bind_partial(*args, **kwargs).arguments.get("output")
        except TypeError:  # (fn's own call raises it)
            output = None
        if not isinstance(output, (str, os.PathLike)):
            return fn(*args, **kwargs)  # (its checks name a bad output)
        target = as_path(output, "The output")
        made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # (deepest first)
        try:  # (the lock lives beside the output: unlocked, two jobs on a new folder's output ran to the end)
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return fn(*args, **kwargs)  # (a parent that is a file, an unwritable one: its checks or its write say so)
        from llmcomp.core import resume

        opened = len(resume.OPENED)
        try:
            with job_lock(target):
                try:
                    return fn(*args, **kwargs)
                except BaseException:
                    resume.drop_idle(opened)  # (a resume folder holding no work yet stayed, hidden, with no note)
                    raise
        except BaseException:
            for p in made:  # a failed job leaves no folder it made (empty ones only)
                try:
                    p.rmdir()
                except OSError:
                    break
            raise

    return call


def null_progress(fn):
    """``progress=None`` is no progress display, as leaving it out is (it failed at the first note, deep inside);
    anything else must be a ``Progress``."""
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if kwargs.get("progress", NULL) is None:
            kwargs["progress"] = NULL
        _expect(kwargs.get("progress", NULL), Progress, "progress", "an llmcomp.core.progress.Progress (or None)")
        return fn(*args, **kwargs)
    return call


def _expect(value, kinds, name: str, what: str) -> None:
    """A UserError where an entry point's config argument is something else (a preset's name, a dict, a format):
    it failed at the first attribute read, deep inside."""
    if not isinstance(value, kinds):
        raise UserError(f"{name} must be {what}, got {type(value).__name__} {value!r:.80}.")


def default_device(device: Optional[str] = None) -> str:
    """``device`` checked (``memory.check_device``), else cuda where a GPU is visible, else cpu."""
    return memory.check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """A dtype's name (``--dtype``) or the torch dtype itself (as ``load`` takes it), one of ``DTYPES``."""
    if name is None:
        return None
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise UserError(f"Unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def _store_dtype(dtype: Optional[str], model, progress: Progress = NULL) -> Optional[torch.dtype]:
    """``--dtype``, else the 16-bit float dtype the source's config.json names: the model is loaded and computed in
    float32 either way, and a writer stores its unquantized tensors as in the model (bf16 sources came out float32,
    twice their size, against the commands' help)."""
    if dtype is not None:
        return parse_dtype(dtype)
    stored = stored_dtype(model_mod.resolve(model, progress.note))  # (the bundled model's conversion is said here)
    return stored if stored in (torch.float16, torch.bfloat16) else None


def open_model(path=None, dtype: Optional[torch.dtype] = None, device: Optional[str] = None, progress: Progress = NULL,
               *, device_map=None, max_memory=None, offload_folder=None, strict_tokenizer: bool = True,
               describe_base: bool = True):
    """Open a model directory or artifact. Returns (model, tokenizer, base_model info, prior stages).
    ``device_map``/``max_memory``/``offload_folder``: accelerate placement (core/memory.py). Tokenizer files that
    do not load are an error, or with ``strict_tokenizer`` off a warning and no tokenizer. ``describe_base`` off: a
    plain model's base info is None (its weights' sha256 reads every byte of them: seconds for a large model)."""
    device, device_map, max_memory, offload_folder = memory.resolve_placement(device, device_map, max_memory,
                                                                              offload_folder)
    place = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder,
             "strict_tokenizer": strict_tokenizer}
    p = model_mod.resolve(path, progress.note)
    if is_artifact(p):
        model, tok, manifest = load_artifact(p, dtype=dtype, device=device, **place)
        return model, tok, manifest["base_model"], manifest["stages"]
    kind = imports.detect(p)
    if kind is not None:  # a GPTQ / compressed-tensors checkpoint: its layers become llmcomp uniform layers
        model, tok, base, stages = imports.open_checkpoint(p, kind, dtype=dtype, device=device,
                                                           strict_tokenizer=strict_tokenizer,
                                                           describe_base=describe_base)
        if device_map is not None:
            model = memory.dispatch(model, device_map, max_memory, offload_folder)
        return model, tok, base, stages
    model, tok = model_mod.load_hf(p, dtype=dtype or torch.float32, **place)
    if device is not None:
        model.to(device)
    if not describe_base:
        return model, tok, None, []
    base = {"name": model_mod.model_name(p), "path": str(p.resolve()), "sha256": model_mod.weights_sha256(p)}
    return model, tok, base, []


def load(path=None, *, dtype: Optional[torch.dtype] = None, device: Optional[str] = None, device_map=None,
         max_memory=None, offload_folder=None, return_tokenizer: bool = False):
    """Load an llmcomp artifact (or a plain model directory; ``None`` = the bundled model) as a runnable
    transformers model. ``device_map="auto"`` places it with accelerate: ``max_memory`` (``{0: "2GiB",
    "cpu": "24GiB"}`` or ``"cuda:0=2GiB,cpu=24GiB"``) bounds the weights per device, the rest goes to
    ``offload_folder`` on disk; either one alone implies ``device_map="auto"``."""
    if not isinstance(return_tokenizer, bool):  # ("no" was truthy: a (model, tokenizer) pair came back)
        raise UserError(f"return_tokenizer must be True or False, got {return_tokenizer!r}.")
    if isinstance(dtype, str):  # ("bfloat16", as quantize(dtype=...) takes it)
        dtype = parse_dtype(dtype)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"dtype must be a floating-point torch dtype or one of {', '.join(DTYPES)}, got {dtype!r}.")
    model, tok, _, _ = open_model(path, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                                  offload_folder=offload_folder, strict_tokenizer=return_tokenizer,
                                  describe_base=False)
    return (model, tok) if return_tokenizer else model


@one_job
@null_progress
def quantize(
    config: QuantConfig,
    output: os.PathLike | str,
    model: Optional[str] = None,
    *,
    overwrite: bool = False,
    calib_samples: Optional[int] = None,
    calib_seq_len: Optional[int] = None,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    shard_bytes: Optional[int] = None,
    allocation: Optional[AllocationConfig] = None,
    calib_batch: Optional[int] = None,
    max_memory=None,
    offload_folder=None,
    progress: Progress = NULL,
) -> Path:
    """Quantize ``model`` (a directory, an artifact, or None for the bundled model) into an artifact.

    With ``allocation``, a first calibration pass picks each layer's bit width under the average
    budget (quant/allocate.py) and ``config`` then quantizes every layer in its chosen format.
    ``max_memory``: its GPU entries hard-cap this process's GPU memory for the job (the model stays in
    CPU memory, one decoder layer at a time on the GPU; ignored where no GPU is visible); a ``cpu`` entry
    is checked against the model's size. Disk offload is not supported here (``offload_folder``).
    The calibration settings (default 128 windows of 512 tokens, seed 0, 8 windows a pass) are refused where
    nothing calibrates: a method that reads no text (RTN), without ``allocation``."""
    _expect(config, QuantConfig, "config", "a quantization config such as llmcomp.PRESETS['w4g128'] or RTNConfig()")
    _expect(allocation, (AllocationConfig, type(None)), "allocation", "an AllocationConfig")
    from llmcomp.quant import METHODS

    quantizer = METHODS.get(config.method)(config)
    calibrates = allocation is not None or quantizer.needs_calibration
    given = {"calib_samples": calib_samples, "calib_seq_len": calib_seq_len, "seed": seed, "calib_batch": calib_batch}
    idle = [name for name, value in given.items() if value is not None]
    if idle and not calibrates:
        raise UserError(f"{idle[0]} does not apply here: method {config.method!r} with these settings reads no "
                        "calibration text.")
    calib_samples = 128 if calib_samples is None else calib_samples
    calib_seq_len = 512 if calib_seq_len is None else calib_seq_len
    seed = 0 if seed is None else seed
    calib_batch = 8 if calib_batch is None else calib_batch
    if not isinstance(calib_batch, int) or isinstance(calib_batch, bool):
        raise UserError(f"--calib-batch must be an integer, got {calib_batch!r}.")
    if shard_bytes is not None and (not isinstance(shard_bytes, int) or isinstance(shard_bytes, bool)
                                    or shard_bytes < 1):
        raise UserError(f"shard_bytes must be a positive integer, got {shard_bytes!r}.")
    output = check_output(output, overwrite, model_mod.read_path(model))
    if offload_folder is not None:
        raise UserError("quantize keeps the model in CPU memory and moves one decoder layer at a time to the GPU; "
                        "disk offload (--offload-folder) is not supported for quantize.")
    if calib_batch < 1:
        raise UserError(f"--calib-batch must be ≥ 1, got {calib_batch}.")
    if allocation is not None and getattr(config, "outliers", 0):
        raise UserError("--outliers does not combine with bit allocation (a fractional --bits): the allocation does "
                        "not count the outliers' bits, so the budget would not hold; give whole bits or drop "
                        "--outliers.")
    if allocation is not None:
        _check_allocation(config, allocation)
    check_calib(calib_samples, calib_seq_len, seed)  # before the model is loaded
    memory.check_device(device)  # a bad --device fails before any work
    limits = memory.parse_max_memory(max_memory)
    gpu_limits = memory.gpu_limits(limits)
    store_dtype = _store_dtype(dtype, model, progress)
    start = time.perf_counter()
    net, tok, base, stages = open_model(model, progress=progress)
    memory.check_cpu_fits(net, limits)
    if any(isinstance(k, int) for k in limits or {}) and not gpu_limits:
        progress.note("No GPU is visible: the GPU limits of --max-memory do not apply.")
    stages = stages + _unfuse_experts(net)
    from llmcomp.quant.base import check_selection

    # (before calibration, allocation and the resume folder; an allocation's formats are checked once chosen)
    chosen = check_selection(net, config, None if allocation is not None else quantizer)
    _note_quantized(net, progress)
    _note_kv_bases(net, chosen, progress)
    if calibrates:  # (a corrupt layer was found when the calibration reached it: the earlier layers' work was lost)
        for name in chosen:
            model_mod.check_finite(name, net.get_submodule(name).weight)

    calib = None
    source = None
    device = default_device(device)
    if calibrates:
        if tok is None:
            raise UserError("Calibration needs a tokenizer, and the model directory has none.")
        check_window(net, calib_seq_len, "Calibration")
        source = corpus().name
        calib = calib_windows(tok, calib_seq_len, calib_samples, seed)
        check_vocab(calib, net)
        note_equal_batch("--calib-batch", calib_batch, calib_samples, progress.note)
    alloc_report = None
    with memory.gpu_cap(gpu_limits):  # a hard cap for the calibrated work (allocation and quantization)
        if allocation is not None:
            config, alloc_report = _allocate(net, config, allocation, calib, device, progress, calib_batch)
        checkpoint = None
        if calib is not None:  # calibrated runs are long: finished layers survive a kill (core/resume.py)
            from llmcomp.core import resume
            from llmcomp.core.artifact import llmcomp_version

            batch = {} if calib_batch == 8 else {"batch": calib_batch}  # fp sums depend on the batch
            key = resume.fingerprint(config=to_dict(config), **_job_key(net, calib, device),
                                     samples=calib_samples, seq_len=calib_seq_len, seed=seed, text=source,
                                     version=llmcomp_version(), **batch)
            checkpoint = resume.for_output(output, key, progress.note, device)
        tied = _tied_head(net)
        report = quantize_model(net, config, calib, progress=progress, device=device, checkpoint=checkpoint,
                                batch_size=calib_batch)
    if tied:
        _note_tied_head(net, progress)
    if alloc_report is not None:
        report["_allocation"] = alloc_report
    sizes = size_report(net, store_dtype=store_dtype)
    stage = {
        "method": config.method,
        "config": to_dict(config),
        "wall_time_s": round(time.perf_counter() - start + (checkpoint.earlier_s if checkpoint else 0.0), 2),
        "metrics": {"bits_per_weight": round(sizes["bits_per_weight"], 4), "layers": report},
        "calibration": None if calib is None else {"text": source, "samples": calib_samples,
                                                   "seq_len": calib_seq_len, "seed": seed},
    }
    kwargs = {"shard_bytes": shard_bytes} if shard_bytes else {}
    progress.note(f"Writing {output}")
    path = write_artifact(output, net, tok, base_model=base, stages=stages + [stage], text_source=source,
                          overwrite=overwrite, dtype=store_dtype, **kwargs)
    if checkpoint is not None:
        checkpoint.finish()
    return path


@one_job
def export(artifact, to: str, output: os.PathLike | str, *, overwrite: bool = False) -> dict:
    """Write an artifact as a checkpoint other tools load (``to``: compressed-tensors | gptq); a summary dict."""
    from llmcomp import interop

    return interop.export(artifact, to, output, overwrite=overwrite)


@one_job
def report(artifact, output: Optional[os.PathLike | str] = None, *, overwrite: bool = False) -> dict:
    """Write ``report.md`` and PNG plots of an artifact (``llmcomp.report``); plots need matplotlib."""
    from llmcomp.report import write_report

    return write_report(artifact, output, overwrite=overwrite)


def _tied_head(net) -> bool:
    """Whether the output head shares its weight with the input embedding (tie_word_embeddings)."""
    head, emb = net.get_output_embeddings(), net.get_input_embeddings()
    w, e = getattr(head, "weight", None), getattr(emb, "weight", None)
    return isinstance(w, torch.Tensor) and isinstance(e, torch.Tensor) and w.data_ptr() == e.data_ptr()


def _note_tied_head(net, progress: Progress) -> None:
    """A quantized tied head gets tensors of its own while the embedding stays float: the artifact holds them on top
    (decode reads the smaller head). Said, since "quantize more" reads as "a smaller file"."""
    from llmcomp.core.qlinear import QuantLinear

    head = net.get_output_embeddings()
    if isinstance(head, QuantLinear):
        mb = sum(t.numel() * t.element_size() for t in head.state_dict().values()) / 1e6
        progress.note(f"lm_head shared the embedding's weights: its quantized copy is stored beside the float "
                      f"embedding (+{mb:.1f} MB against keeping lm_head float; decode reads it instead).")


def _note_quantized(net, progress: Progress) -> None:
    """The linears an earlier stage quantized are not re-quantized (their float weights are gone): said, since the
    new format would otherwise read as the whole model's."""
    from llmcomp.core.qlinear import QuantLinear

    done = sum(isinstance(m, QuantLinear) for m in net.modules())
    if done:
        progress.note(f"{done} linear layers an earlier stage quantized are left as they are (re-quantizing them "
                      "needs the original model).")


def _note_kv_bases(net, chosen: list[str], progress: Progress) -> None:
    """CSKV bases (``prune kv --method cskv``) span the outputs of the k_proj / v_proj they were fitted to; where
    this run quantizes those projections the bases are kept as they are, not refitted to the quantized ones: said."""
    def basis(name):  # (model.layers.3.self_attn.k_proj → that attention's kv_basis.k_basis; None: no basis)
        parent, _, leaf = name.rpartition(".")
        kv = getattr(net.get_submodule(parent), "kv_basis", None) if leaf in ("k_proj", "v_proj") else None
        return getattr(kv, f"{leaf[0]}_basis", None)

    hit = [n for n in chosen if basis(n) is not None]
    if hit:
        progress.note(f"The CSKV bases of an earlier stage were fitted to the float k_proj / v_proj and are kept for "
                      f"the {len(hit)} quantized here (quantize first, then prune kv, to fit them to these).")


def _job_key(net, calib_ids, device) -> dict:
    """What a resumed job must share with the killed one besides its flags: the weights, the model's config,
    the calibration tokens (the tokenizer's doing), the kind of device (CPU and GPU sums differ in their
    last bits, and a resumed run promises the uninterrupted run's bytes) and the dynamic skip thresholds an input
    artifact installed (they change the routing the calibration sees; an input re-made with another rate resumed
    the layers calibrated under the old one)."""
    import hashlib

    from llmcomp.prune import moe

    try:
        skip = {b.path: b.router.skip_threshold for b in moe.find_moe_blocks(net, strict=False)
                if getattr(b.router, "skip_threshold", None) is not None}
    except UserError:  # no decoder layer list: no MoE blocks we know
        skip = {}
    return {"weights": _weights_key(net),
            "model_config": hashlib.sha256(net.config.to_json_string().encode()).hexdigest(),
            "calibration_ids": hashlib.sha256(calib_ids.cpu().numpy().tobytes()).hexdigest(),
            "device": torch.device(device).type, **({"skip_thresholds": skip} if skip else {})}


def _weights_key(net) -> str:
    """The identity of the weights being quantized: names, shapes, dtypes and a CRC-32 of every tensor's bytes
    (~4 GB/s on one core: a sample missed edits of a few rows)."""
    import hashlib
    import zlib

    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(zlib.crc32(memoryview(raw.numpy())).to_bytes(4, "little"))
    return h.hexdigest()


@one_job
@null_progress
def prune_kv(policy, output: os.PathLike | str, model: Optional[str] = None, *, overwrite: bool = False,
             device: Optional[str] = None, dtype: Optional[str] = None, progress: Progress = NULL) -> Path:
    """Record a KV-cache policy (``llmcomp.prune.kv`` config) in an artifact; calibrated policies
    (DuoAttention heads, CSKV bases) are calibrated here. ``llmcomp.load`` re-installs the policy."""
    from llmcomp.prune.kv.base import KVPolicy

    _expect(policy, KVPolicy, "policy", "a KV policy config such as KIVIConfig(bits=4)")
    memory.check_device(device)  # a bad --device fails before any work
    from llmcomp.prune.kv.cache import check_supported

    output = check_output(output, overwrite, model_mod.read_path(model))
    store_dtype = _store_dtype(dtype, model, progress)
    start = time.perf_counter()
    net, tok, base, stages = open_model(model, progress=progress)
    if any(s.get("kind") == "kv" for s in stages):
        raise UserError(f"{model} already has a KV policy; apply KV policies to a model without one.")
    check_supported(net)
    source = None
    if policy.needs_calibration and getattr(policy, "calibrated_on_text", True):
        if tok is None:
            raise UserError(f"{policy.method} calibrates on text, and {model} has no tokenizer to encode it with.")
        source = corpus().name
    policy.validate_for(net.config)
    policy, report = policy.calibrate(net, tok, progress, default_device(device))
    net.to("cpu")
    stage = {"method": f"kv-{policy.method}", "kind": "kv", "config": to_dict(policy),
             "wall_time_s": round(time.perf_counter() - start, 2), "metrics": {"policy": policy.describe(), **report},
             "calibration": None if source is None else {"text": source}}
    progress.note(f"Writing {output}")
    return write_artifact(output, net, tok, base_model=base, stages=stages + [stage], text_source=source,
                          overwrite=overwrite, dtype=store_dtype)


def _calibrated(model, output, overwrite, calib_samples, calib_seq_len, seed, progress, check=None):
    """Open ``model`` for a calibrated rewrite into ``output`` (``check(net, stages)`` vets it first):
    (output, net, tok, base, stages, calibration ids, calibration info)."""
    output = check_output(output, overwrite, model_mod.read_path(model))
    check_calib(calib_samples, calib_seq_len, seed)  # before the model is loaded
    net, tok, base, stages = open_model(model, progress=progress)
    if check is not None:
        check(net, stages)
    if tok is None:
        raise UserError("Calibration needs a tokenizer, and the model directory has none.")
    check_window(net, calib_seq_len, "Calibration")
    ids = calib_windows(tok, calib_seq_len, calib_samples, seed)
    check_vocab(ids, net)
    info = {"text": corpus().name, "samples": calib_samples, "seq_len": calib_seq_len, "seed": seed}
    return output, net, tok, base, stages, ids, info


def _unfuse_experts(net) -> list[dict]:
    """MoE experts stored fused become one linear pair per expert, so quantization reaches them like any
    linear; returns the manifest stage that makes llmcomp.load rebuild that structure."""
    from llmcomp.prune import moe

    try:
        blocks = moe.find_moe_blocks(net, strict=False)
    except UserError:  # no decoder layer list: not a model with MoE blocks we know
        return []
    if all(b.unfused for b in blocks):
        return []
    for b in blocks:
        moe.unfuse(b)
    return [{"method": "unfuse-experts", "kind": moe.KIND, "config": {}, "shapes": moe.shapes(net),
             "wall_time_s": 0.0, "metrics": {}}]


@one_job
@null_progress
def prune_experts(config, output: os.PathLike | str, model: Optional[str] = None, *, overwrite: bool = False,
                  calib_samples: int = 32, calib_seq_len: int = 512, seed: int = 0, device: Optional[str] = None,
                  dtype: Optional[str] = None, progress: Progress = NULL) -> Path:
    """Remove routed experts (or, with HEAPr, neurons) of an MoE model (``prune.experts.ExpertPruneConfig``)
    scored from one calibration pass; the artifact records the new shapes (``llmcomp.load`` rebuilds them)."""
    from llmcomp.prune.experts import ExpertPruneConfig

    _expect(config, ExpertPruneConfig, "config", "an ExpertPruneConfig")
    memory.check_device(device)  # a bad --device fails before any work
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.prune import experts, moe

    store_dtype = _store_dtype(dtype, model, progress)
    start = time.perf_counter()

    def check(net, _):
        blocks = moe.require_moe(net, str(model or model_mod.DEFAULT_MODEL))
        if config.method == "heapr" and any(isinstance(m, QuantLinear) for b in blocks for m in b.experts.modules()):
            raise UserError("HEAPr removes neurons from experts, and this model's experts are quantized; prune the "
                            "original model, then quantize.")  # (before the calibration pass, not after it)
        experts.check_ratios(blocks, config)

    output, net, tok, base, stages, ids, info = _calibrated(
        model, output, overwrite, calib_samples, calib_seq_len, seed, progress, check=check)
    stats = experts.collect_stats(net, ids, config, device=default_device(device), progress=progress)
    report = experts.prune(net, stats, config)
    if any(s.get("skip_threshold") is not None for s in stages):  # (kept, and re-installed at load: said, not silent)
        progress.note("The dynamic skip threshold of an earlier stage was calibrated on the routing before this "
                      "pruning and stays in force; its skip rate now differs (run prune dynamic again to re-measure).")
    stage = {"method": f"experts-{config.method}", "kind": moe.KIND, "config": to_dict(config),
             "shapes": moe.shapes(net), "wall_time_s": round(time.perf_counter() - start, 2), "metrics": report,
             "calibration": info}
    stages = experts.follow_experts(stages, {p: r["removed"] for p, r in report["layers"].items() if "removed" in r},
                                    net)
    progress.note(f"Writing {output}")
    return write_artifact(output, net, tok, base_model=base, stages=stages + [stage], text_source=info["text"],
                          overwrite=overwrite, dtype=store_dtype)


@one_job
@null_progress
def skip_experts(config, output: os.PathLike | str, model: Optional[str] = None, *, overwrite: bool = False,
                 calib_samples: int = 16, calib_seq_len: int = 512, seed: int = 0, device: Optional[str] = None,
                 dtype: Optional[str] = None, progress: Progress = NULL) -> Path:
    """Record an MC-MoE dynamic skip threshold (``prune.experts.DynamicSkipConfig``) calibrated on the text;
    ``llmcomp.load`` re-installs it, so every forward then skips the low-weight expert choices."""
    from llmcomp.prune import mcmoe, moe

    _expect(config, mcmoe.DynamicSkipConfig, "config", "a DynamicSkipConfig")
    memory.check_device(device)  # a bad --device fails before any work
    store_dtype = _store_dtype(dtype, model, progress)  # (a bf16 model was stored as float32: twice the size)
    start = time.perf_counter()
    output, net, tok, base, stages, ids, info = _calibrated(
        model, output, overwrite, calib_samples, calib_seq_len, seed, progress,
        check=lambda net, _: moe.require_moe(net, str(model or model_mod.DEFAULT_MODEL), "dynamic expert skipping"))
    earlier = [s for s in stages if s.get("skip_threshold") is not None]
    moe.remove_skip(net)  # the new threshold replaces an earlier dynamic stage's, measured on unmasked routing
    tau, report = mcmoe.skip_threshold(net, ids, config.rate, device=default_device(device), progress=progress)
    if earlier:
        report["replaces_threshold"] = earlier[-1]["skip_threshold"]
    net.to("cpu")
    stage = {"method": "experts-dynamic-skip", "kind": moe.KIND, "config": to_dict(config), "shapes": moe.shapes(net),
             "skip_threshold": tau, "wall_time_s": round(time.perf_counter() - start, 2), "metrics": report,
             "calibration": info}
    progress.note(f"Writing {output}")
    return write_artifact(output, net, tok, base_model=base, stages=stages + [stage], text_source=info["text"],
                          overwrite=overwrite, dtype=store_dtype)


@one_job
@null_progress
def moefy(config, output: os.PathLike | str, model: Optional[str] = None, *, overwrite: bool = False,
          calib_samples: int = 32, calib_seq_len: int = 512, seed: int = 0, device: Optional[str] = None,
          dtype: Optional[str] = None, progress: Progress = NULL) -> Path:
    """Convert a dense Llama-style model into a stock transformers MoE (``convert.moefy.MoefyConfig``):
    MLP neurons clustered into experts, routers calibrated on the bundled text."""
    from llmcomp.convert.moefy import MoefyConfig

    _expect(config, MoefyConfig, "config", "a MoefyConfig")
    memory.check_device(device)  # a bad --device fails before any work
    from llmcomp.convert.moefy import moefy_model, target_config

    store_dtype = _store_dtype(dtype, model, progress)
    start = time.perf_counter()
    def check(net, stages):
        if stages:
            done = ", ".join(str(s.get("method")) for s in stages)  # (an artifact, or an imported GPTQ checkpoint)
            raise UserError(f"{model} is already compressed ({done}); moefy converts an original dense model.")
        target_config(net.config, config)  # unsupported architectures fail before calibration

    output, net, tok, base, stages, ids, info = _calibrated(model, output, overwrite, calib_samples, calib_seq_len,
                                                            seed, progress, check=check)
    net, report = moefy_model(net, ids, config, device=default_device(device), progress=progress)
    net.to("cpu")
    stage = {"method": "moefy", "config": to_dict(config), "wall_time_s": round(time.perf_counter() - start, 2),
             "metrics": report, "calibration": info}
    progress.note(f"Writing {output}")
    return write_artifact(output, net, tok, base_model=base, stages=[stage], text_source=info["text"],
                          overwrite=overwrite, dtype=store_dtype)


def context_limit(p) -> int:
    """The model's context in tokens (``max_position_embeddings``); 0 where its config does not say or cannot be
    read (loading the model reports the latter)."""
    from transformers import AutoConfig

    try:
        return config_context(AutoConfig.from_pretrained(p))
    except (OSError, ValueError, TypeError, KeyError):
        return 0


def config_context(config) -> int:
    """``max_position_embeddings`` of a model config, times its RoPE scaling factor where it has one (YaRN and the
    like run past it); 0 where the config does not say."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    scaling = getattr(config, "rope_scaling", None)
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if not (isinstance(factor, (int, float)) and factor > 1):
        return limit
    base = scaling.get("original_max_position_embeddings")  # (Llama 3.1's limit already counts the factor)
    return max(limit, int((base if isinstance(base, int) and base > 0 else limit) * factor))


def check_window(net, seq_len: int, what: str = "Evaluation") -> None:
    """UserError when an evaluation (or calibration) window of ``seq_len`` tokens does not fit the loaded model's
    context (checked after loading, so that a damaged model or artifact is reported first)."""
    limit = config_context(net.config)
    if limit and seq_len > limit:
        raise UserError(f"{what} windows of {seq_len} tokens are longer than the model's context ({limit} "
                        "tokens); use shorter windows (--seq-len).")


LONG_CHUNK = 64  # evaluate_long's prefill chunk (tokens)


def check_long(context, n_windows, passkey_lengths, passkey_samples, needle_keys, *, chunk: int = LONG_CHUNK) -> None:
    """``evaluate_long``'s settings as one error each, before a model is loaded (library calls took -1, 1.5 or 0
    into tracebacks deep in the evaluation). ``chunk``: the library's prefill chunk (the CLI has no flag for it)."""
    for name, value, low in (("--context", context, 16), ("--windows", n_windows, 1), ("chunk", chunk, 1),
                             ("--passkey-samples", passkey_samples, 0), ("--needle-keys", needle_keys, 0)):
        require_int(name, value, low)
    if not (isinstance(passkey_lengths, (tuple, list))
            and all(isinstance(n, int) and not isinstance(n, bool) for n in passkey_lengths)):
        raise UserError(f"--passkey-lengths must be a sequence of token counts, e.g. (1024, 2048); got "
                        f"{passkey_lengths!r}.")
    from llmcomp.core.passkey import LABELS

    if needle_keys > len(LABELS):  # (it said "The number of needle keys must be between 1 and 30": 0 is none)
        raise UserError(f"--needle-keys must be at most {len(LABELS)} (0: no needle prompts), got {needle_keys}.")
    if needle_keys and not (passkey_lengths and passkey_samples):  # (its prompts are built beside the passkey ones)
        raise UserError("--needle-keys runs with the passkey prompts; give --passkey-samples ≥ 1 and "
                        "--passkey-lengths, or --needle-keys 0.")
    if passkey_samples and not passkey_lengths:  # (it ran none, and the footer said N prompts per length)
        raise UserError(f"--passkey-samples {passkey_samples} asks for passkey prompts, and --passkey-lengths gives "
                        "no length; give lengths, or --passkey-samples 0.")


def check_long_lengths(limit: int, context: int, passkey_lengths=(), passkey_samples: int = 1) -> None:
    """UserError when a window or a retrieval prompt (plus its generated answer) does not fit the model's
    context of ``limit`` tokens (0 = unknown, nothing checked)."""
    from llmcomp.eval.longctx import ANSWER_TOKENS, answer_positions

    if limit and context > limit:
        raise UserError(f"A context of {context} tokens is longer than the model's ({limit} tokens).")
    if passkey_samples and any(n < 1 for n in passkey_lengths):
        raise UserError(f"Passkey prompt lengths must be positive token counts, got "
                        f"{', '.join(map(str, passkey_lengths))}.")
    longest = max(passkey_lengths, default=0) if passkey_samples else 0
    if limit and answer_positions(longest) > limit:
        raise UserError(f"A passkey prompt of {longest} tokens plus its {ANSWER_TOKENS - 1} generated answer tokens "
                        f"is longer than the model's context ({limit} tokens); use lengths up to "
                        f"{limit - ANSWER_TOKENS + 1}.")


def _named(path, p: Path) -> dict:
    """A result row's path and name: the bundled model as ``smollm2-135m`` however it was named (the alias gave its
    cache folder's name, SmolLM2-135M-Instruct, and no path the alias), anything else as its folder."""
    if model_mod.is_bundled(path):
        return {"path": model_mod.DEFAULT_MODEL, "name": model_mod.DEFAULT_MODEL}
    shown = str(path)  # (a folder named like the alias: its absolute path, which record_evaluations reads back)
    return {"path": shown if shown != model_mod.DEFAULT_MODEL else str(p.absolute()), "name": p.resolve().name}


def check_long_fit(path, context: int, passkey_lengths=(), passkey_samples: int = 0) -> None:
    """The evaluation's lengths against a model's context and an artifact's KV policy (its manifest's) against the
    evaluation's shortest context, before any model loads (``eval --long`` over several models found one's misfit
    after the earlier ones had run)."""
    from transformers import AutoConfig

    from llmcomp.prune.kv.hook import policy_of

    p = model_mod.read_path(path)
    check_long_lengths(context_limit(p), context, passkey_lengths, passkey_samples)
    if not is_artifact(p):
        return
    kv = [s for s in read_manifest(p, verify=False)["stages"] if s.get("kind") == _kv_hook.KIND]
    if kv:
        shortest = min([context, *(passkey_lengths if passkey_samples else ())])
        policy_of(kv[-1]).validate_for(AutoConfig.from_pretrained(p), context=shortest)


@null_progress
def evaluate_long(path=None, *, context: int = 2048, n_windows: int = 4, chunk: int = LONG_CHUNK,
                  passkey_lengths=(1024, 2048), passkey_samples: int = 10, needle_keys: int = 0,
                  device: Optional[str] = None, progress: Progress = NULL) -> dict:
    """Long-context metrics with the model's KV policy active (eval/longctx.py): continuation ppl over a
    compressed prefix, KV bytes held, passkey retrieval accuracy and, with ``needle_keys`` > 0, multi-key
    needle retrieval accuracy (``needle_keys`` labelled needles per prompt, one asked)."""
    from llmcomp.eval.longctx import long_context_eval
    from llmcomp.prune.kv.cache import installed_policy

    check_long(context, n_windows, passkey_lengths, passkey_samples, needle_keys, chunk=chunk)
    p = model_mod.resolve(path, progress.note)
    check_long_fit(p, context, passkey_lengths, passkey_samples)
    net, tok, _, stages = open_model(p, progress=progress, device=default_device(device), describe_base=False)
    if tok is None:
        raise UserError(f"{p} has no tokenizer files; evaluation needs one.")
    policy = installed_policy(net)
    start = time.perf_counter()
    result = long_context_eval(net, tok, context=context, n_windows=n_windows, chunk=chunk,
                               passkey_lengths=tuple(passkey_lengths), passkey_n=passkey_samples,
                               needle_keys=needle_keys, progress=progress)
    note_fewer_windows(result["windows"], n_windows, context, progress)  # (the table's caption gave the count only)
    return {**_named(path, p),
            "stages": " + ".join(stage_label(s) for s in stages) or "original",
            "policy": policy.describe() if policy is not None else next(  # (a linear window's settings: its state)
                (stage_label(s) for s in stages if s.get("kind") == _linearize_hook.KIND), "dense"),
            **result, "text": corpus().name, "tokenizer": tokenizer_id(tok),  # (eval --long --compare)
            "eval_time_s": round(time.perf_counter() - start, 2)}


def _check_allocation(config: QuantConfig, allocation: AllocationConfig) -> None:
    """An allocation gives every target layer its own format: its group size and symmetry, a width from its
    candidates. A config whose format says otherwise, or that names per-layer formats, was overridden silently."""
    from llmcomp.formats import Uniform

    fmt = config.format
    if not isinstance(fmt, Uniform):
        raise UserError(f"Bit allocation chooses among uniform integer widths; {type(config).__name__}'s format "
                        f"{type(fmt).__name__} does not take it (give whole bits, or a uniform format).")
    if config.formats:
        raise UserError("Bit allocation chooses every layer's format; drop config.formats or the allocation.")
    if (fmt.group_size, fmt.symmetric) != (allocation.group_size, allocation.symmetric):
        raise UserError(f"The config's format (group size {fmt.group_size}, symmetric={fmt.symmetric}) differs from "
                        f"the allocation's (group size {allocation.group_size}, symmetric={allocation.symmetric}), "
                        f"whose formats would replace it; give both the same, e.g. AllocationConfig(..., "
                        f"group_size={fmt.group_size}, symmetric={fmt.symmetric}).")


def _allocate(net, config: QuantConfig, allocation: AllocationConfig, calib, device, progress, calib_batch: int = 8):
    """Measure per-layer errors, solve the allocation, return the config with per-layer formats."""
    from llmcomp.core.select import select_linears
    from llmcomp.quant import allocate
    from llmcomp.prune.mcmoe import expert_importance

    shapes = {n: (m.out_features, m.in_features) for n, m in select_linears(net, config.targets, config.ignore)}
    formats = allocation.formats()
    allocate.check_budget(formats, allocation.budget, shapes)  # before minutes of measuring
    table = allocate.measure_errors(net, calib, config.targets, config.ignore, allocation, device=device,
                                    progress=progress, batch_size=calib_batch)
    importance = expert_importance(net, calib, device=device, progress=progress, batch_size=calib_batch)  # {}: dense
    if allocation.sensitivity == "output":  # MC-MoE: an expert's error counts as much as it is routed to
        for name, weight in importance.items():  # (the Fisher sensitivity already sees the routing)
            if name in table:
                table[name]["errors"] = [e * weight for e in table[name]["errors"]]
    shapes = {n: shapes[n] for n in table}  # (the layers measured: measure_errors selects them the same way)
    assignment = allocate.solve(table, formats, allocation.budget, shapes)
    achieved = allocate.average_bits(assignment, shapes)
    counts = {f.describe(): sum(1 for a in assignment.values() if a == f) for f in formats}
    report = {"config": to_dict(allocation), "achieved_bits_per_weight": round(achieved, 4), "layers_per_format": counts,
              "bits": {n: f.bits for n, f in assignment.items()}}
    if importance:
        report["expert_importance"] = {n: round(w, 6) for n, w in importance.items() if ".experts.down." in n}
    unseen = sorted(n for n, t in table.items() if t.get("unseen"))
    if unseen:  # experts no calibration token was routed to: scored 0, so given the cheapest width
        report["no_calibration_tokens"] = unseen
    return dataclasses.replace(config, formats=assignment), report


def recorded_base(path) -> Optional[str]:
    """The base model directory an artifact's manifest names, unchecked (None: ``path`` is no artifact, or names
    none)."""
    p = model_mod.read_path(path)
    if not is_artifact(p):
        return None
    base = read_manifest(p, verify=False)["base_model"].get("path")
    return base if isinstance(base, str) else None


def base_model_path(path) -> str:
    """The base model directory recorded in an artifact's manifest (for ``--reference base``)."""
    p = model_mod.resolve(path)
    if not is_artifact(p):  # (it was its own reference: KL 0, top-1 100 %, recorded as such by --record)
        raise UserError(f"{'The bundled model' if model_mod.is_bundled(path) else p} is not an llmcomp artifact, so no "
                        "manifest names its base model; pass --reference PATH.")
    return model_mod.checked_base(p, read_manifest(p, verify=False)["base_model"], "--reference PATH")


@null_progress
def record_reference(path=None, *, seq_len: int = 512, n_windows: int = 16, batch_size: int = 4,
                     device: Optional[str] = None, device_map=None, max_memory=None, offload_folder=None,
                     progress: Progress = NULL) -> Reference:
    """Run the reference (original) model once; its log-probs go to disk (see eval/agreement.py)."""
    check_eval(seq_len, n_windows, batch_size)
    p = model_mod.resolve(path, progress.note)
    net, tok, _, _ = open_model(p, progress=progress, describe_base=False,
                                **_placement(device, device_map, max_memory, offload_folder))
    check_window(net, seq_len)
    if tok is None:
        raise UserError(f"{path} has no tokenizer files; evaluation needs one.")
    windows = eval_windows(tok, seq_len, n_windows)
    note_fewer_windows(windows.shape[0], n_windows, seq_len, progress)
    check_vocab(windows, net)
    ref = Reference.record(net, windows, batch_size=batch_size, progress=progress, tokenizer=tokenizer_id(tok))
    ref.asked = (n_windows, seq_len)  # (what an evaluation against it must ask for: evaluate)
    ref.source = _named(path, p)["path"]  # (each row against it says which model it was)
    del net
    return ref


def check_reference_tokenizer(reference, paths) -> None:
    """Each of ``paths`` reads the token ids of the ``reference`` model, from their tokenizer files, before any model
    runs: ``Reference.check_model`` found another tokenizer after the reference's whole pass (minutes on a large
    model, its log-probs written to disk first)."""
    from llmcomp.eval.agreement import other_tokenizer

    def fingerprint(p: Path):
        tok = model_mod.load_tokenizer(p)
        return tokenizer_id(tok) if tok is not None else None

    want = fingerprint(model_mod.resolve(reference))
    if want is None:  # (a reference without tokenizer files is refused when record_reference loads it)
        return
    for path in paths:
        p = model_mod.resolve(path)
        got = fingerprint(p)
        if got is not None and got != want:
            raise other_tokenizer(str(p))


def note_fewer_windows(got: int, asked: int, seq_len: int, progress: Progress) -> None:
    """A note where the held-out text holds fewer windows than asked for (the result's ``windows`` tells, quietly)."""
    if got < asked:
        progress.note(f"The held-out text holds {got} windows of {seq_len} tokens; evaluating those {got} "
                      f"(--windows {asked}).")


def check_eval(seq_len, n_windows, batch_size) -> None:
    """Perplexity settings as one error each (library calls took 0, 1, -5 or 32.0 into deep tracebacks)."""
    for name, value, low in (("--seq-len", seq_len, 2), ("--windows", n_windows, 1), ("--batch-size", batch_size, 1)):
        require_int(name, value, low)


def _placement(device, device_map, max_memory, offload_folder) -> dict:
    """open_model's placement keywords: an accelerate device map if one is asked for, else ``device``."""
    if device_map is None and max_memory is None and offload_folder is None:
        return {"device": default_device(device)}
    return {"device": device, "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}


@null_progress
def evaluate(path=None, *, seq_len: int = 512, n_windows: int = 16, batch_size: int = 4,
             device: Optional[str] = None, reference: Optional[Reference] = None,
             device_map=None, max_memory=None, offload_folder=None, progress: Progress = NULL) -> dict:
    """Perplexity on the held-out text, bits per weight and size for a model directory or artifact;
    with a ``reference``, also KL divergence, top-1 agreement and greedy common prefix against it.
    ``device_map``/``max_memory``/``offload_folder``: accelerate placement, as in ``load``."""
    check_eval(seq_len, n_windows, batch_size)
    if reference is not None and not isinstance(reference, Reference):
        raise UserError(f"reference must be a Reference (api.record_reference(path)), got {type(reference).__name__}.")
    asked = reference.asked if reference is not None else None
    if asked is not None and asked != (n_windows, seq_len):  # (its windows are scored: other settings were ignored)
        raise UserError(f"The reference was recorded at n_windows={asked[0]}, seq_len={asked[1]}; evaluate at the "
                        f"same (got {n_windows} and {seq_len}).")
    p = model_mod.resolve(path, progress.note)
    net, tok, _, stages = open_model(p, progress=progress, describe_base=False,
                                     **_placement(device, device_map, max_memory, offload_folder))
    check_window(net, seq_len)
    if tok is None:
        raise UserError(f"{p} has no tokenizer files; evaluation needs one.")
    if reference is not None:
        reference.check_model(str(p), tok, getattr(net.config, "vocab_size", None))
    # (what was loaded, read now: an --overwrite during the evaluation gave a row of two artifacts' numbers)
    sizes, loaded = size_report(net, p), {}
    if is_artifact(p):
        loaded["quant_time_s"] = stages_seconds(stages)
        seal = read_manifest(p, verify=False).get(SEAL)
        if seal is not None:
            loaded[SEAL] = seal
    start = time.perf_counter()
    windows = reference.windows if reference is not None else None
    ppl = perplexity(net, tok, seq_len=seq_len, n_windows=n_windows, batch_size=batch_size, progress=progress,
                     windows=windows, comparer=reference.comparer() if reference is not None else None)
    if reference is None:  # (a reference's windows were counted when it was recorded)
        note_fewer_windows(ppl["windows"], n_windows, seq_len, progress)
    return {
        **_named(path, p),
        "stages": " + ".join(stage_label(s) for s in stages) or "original",
        **ppl,
        **sizes,
        "text": corpus().name,
        "tokenizer": tokenizer_id(tok),  # (perplexities compare only under one tokenizer: eval --compare)
        **({"reference": reference.source} if reference is not None else {}),
        "eval_time_s": round(time.perf_counter() - start, 2),
        **loaded,
    }


def record_evaluations(rows: list[dict]) -> None:
    """Append each evaluated artifact's metrics to its manifest (plain model directories are skipped)."""
    from llmcomp.core.artifact import record_evaluation

    for r in rows:
        p = model_mod.resolve(r["path"]) if r["path"] != model_mod.DEFAULT_MODEL else None
        if p is not None and is_artifact(p):
            record_evaluation(p, {k: v for k, v in r.items() if k not in ("path", "name", SEAL)}, seal=r.get(SEAL))


def stages_seconds(stages) -> float:
    """The seconds an artifact's stages took, summed over the numbers its manifest holds (a hand-edited, unsealed one
    may hold anything): eval's quant s column and the report's total. An import stage's time is not counted: it is
    the reading of another tool's checkpoint by the command that made the next stage, whose time includes it (the
    sum read 3.09 + 8.17 s where the quantize command took 8.17 s)."""
    times = [s.get("wall_time_s") for s in stages if not str(s.get("method")).startswith("import-")]
    return float(sum(t for t in times if isinstance(t, (int, float)) and not isinstance(t, bool)))


def stage_label(stage: dict) -> str:
    """``"rtn int4 g128 asym"`` from a manifest stage."""
    settings = _stage_settings(stage)
    if settings is not None:
        return settings
    layers = stage.get("metrics", {}).get("layers")
    alloc = layers.get("_allocation") if isinstance(layers, dict) else None
    names = [str(n) for n in layers if not str(n).startswith("_")] if isinstance(layers, dict) else []
    if isinstance(alloc, dict) and isinstance(alloc.get("bits"), dict):
        names += [str(n) for n in alloc["bits"] if str(n) not in names]
    # (a head-only stage read "rtn int4 g32 asym" like a second pass over the decoder, and eval's bits/weight
    # column beside it, which counts no lm_head, did not move; an allocation's b/w counted the head, the column not)
    heads, total = sum(n.split(".")[-1] == "lm_head" for n in names), len(names)
    metrics = stage.get("metrics") if isinstance(stage.get("metrics"), dict) else {}
    if not names and metrics.get("quantized_lm_head") is True:  # (an import records no per-layer names)
        heads, total = 1, metrics.get("imported_layers")
    head = ["lm_head only" if heads == total else "with lm_head"] if heads else []
    if isinstance(alloc, dict) and isinstance(alloc.get("achieved_bits_per_weight"), (int, float)):
        return f"{stage['method']} alloc {alloc['achieved_bits_per_weight']:.2f} b/w" + "".join(", " + h for h in head)
    config = stage.get("config") if isinstance(stage.get("config"), dict) else {}
    # (W4A4 and the LLM-FP4 search wrote the labels of plain W4 and of the format searched from)
    extra = ["searched element/clip"] if config.get("search") is True else []
    act = config.get("act_bits")
    if isinstance(act, int) and act != 16:
        extra.append(f"A{act} {config.get('act_format', 'fp')}")
    if config.get("act_order") is False:  # (GPTQ with and without it read the same in eval --compare)
        extra.append("no act-order")
    outliers = config.get("outliers")  # (its bits/weight counted them, and the label said plain int3)
    if isinstance(outliers, (int, float)) and not isinstance(outliers, bool) and outliers > 0:
        extra.append(f"{100 * outliers:g}% fp16 outliers")
    extra += head
    tail = f", {', '.join(extra)}" if extra else ""
    fmt = config.get("format")
    if isinstance(fmt, dict):
        try:
            return f"{stage['method']} {from_dict(fmt).describe()}{tail}"
        except (UserError, TypeError):
            pass
    return stage["method"] + tail


def _stage_settings(stage: dict) -> Optional[str]:
    """A KV policy's, an expert pruning's, a moefy conversion's or a linearization's label with the settings that tell
    its runs apart (``kv-kivi 4-bit g32 residual 128``, ``experts-frequency ratio 0.25``, ``moefy 8 experts top-2,
    512 shared neurons``, ``linearize-gla window 64, 2 softmax layers, fine-tune 1M tokens``): two KIVI widths,
    pruning ratios, expert counts or softmax windows read the same in eval --compare."""
    metrics = stage.get("metrics") if isinstance(stage.get("metrics"), dict) else {}
    if stage.get("kind") == _kv_hook.KIND and isinstance(metrics.get("policy"), str):
        return f"kv-{metrics['policy']}"
    config = stage.get("config") if isinstance(stage.get("config"), dict) else {}
    if stage.get("kind") == _linearize_hook.KIND:
        return _linearize_settings(stage, config, metrics)
    if stage.get("method") == "moefy" and config:
        return _moefy_settings(config)
    if stage.get("kind") != _moe_hook.KIND or not config:  # (unfuse-experts has none)
        return None
    shown = [f"{k} {v:g}" for k, v in config.items() if k in ("ratio", "rate") and _number(v)]
    if config.get("layer_ratios"):
        shown.append("per-layer ratios")
    return " ".join([str(stage["method"]), *shown])


def _number(v) -> bool:
    """A setting read back from a manifest is a number (a hand-edited, unsealed one may hold anything)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _moefy_settings(config: dict) -> str:
    """``moefy 8 experts top-2, 512 shared neurons`` (Qwen2-MoE) or ``moefy 8 experts top-2`` (Mixtral)."""
    experts, top_k, shared = (config.get(k) for k in ("experts", "top_k", "shared"))
    label = "moefy" + (f" {experts} experts" if _number(experts) else "") + (f" top-{top_k}" if _number(top_k) else "")
    return label + (f", {shared} shared neurons" if _number(shared) and shared else "")


def _linearize_settings(stage: dict, config: dict, metrics: dict) -> str:
    """``linearize-hedgehog window 64, 2 softmax layers, fine-tune 1M tokens``: the student's softmax window (and
    its Hedgehog features where not the head dimension), the layers kept softmax and the tokens the fine-tune ran
    (the budget in whole steps; the budget itself where the stage does not record them)."""
    from llmcomp.report.facts import linear_window, softmax_layers

    shown = [f"{stage.get('method')} {linear_window(config)}"]
    features = config.get("feature_dim")
    if _number(features) and features and config.get("method") == "hedgehog":
        shown.append(f"{features} features")
    kept = softmax_layers(stage)
    if kept:
        shown.append(f"{len(kept)} softmax layer{'s' if len(kept) > 1 else ''}")
    tokens, ran = config.get("tokens"), metrics.get("finetune")
    if isinstance(ran, dict) and _number(ran.get("tokens")):  # (whole steps: --tokens 1000 ran 960, read "1k")
        tokens = ran["tokens"]
    if _number(tokens):
        shown.append(f"fine-tune {_count(tokens)} tokens" if tokens else "transfer only")
    return ", ".join(shown)


def _count(n: float) -> str:
    """A token count as ``linearize --tokens`` takes it where it is round (``1M``, ``500k``), else whole (``999424``:
    rounded to 4 digits, 999 999 read "1000k" and 1 234 567 the same as 1 234 999)."""
    for scale, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= scale and n % scale == 0:
            return f"{int(n // scale)}{suffix}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:g}"


def inspect(path) -> dict:
    """The manifest of an artifact (verified), or a short description of a model directory: its kind where it is a
    GPTQ or compressed-tensors checkpoint. A folder holding llmcomp's packed tensors without its manifest is refused
    (it was shown as a plain model directory, exit 0, by the command that verifies artifacts)."""
    p = model_mod.resolve(path)
    if is_artifact(p):
        return read_manifest(p)
    kind = imports.detect(p)
    if kind is None:
        packed = _packed_tensor(p)
        if packed is not None:
            raise UserError(f"{p} holds quantized tensors (e.g. {packed}) but no llmcomp.json: an llmcomp artifact "
                            "whose manifest is missing? It cannot be verified.")
    return {"model_dir": str(p.absolute()), "name": model_mod.model_name(p), **({"checkpoint": kind} if kind else {})}


def _packed_tensor(p: Path) -> Optional[str]:
    """The first tensor name of llmcomp's packed layout in the folder's safetensors files (headers only), or None."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                hit = next((k for k in st.keys() if k.endswith(".weight_packed")), None)
        except (OSError, SafetensorError):
            continue
        if hit is not None:
            return hit
    return None


@one_job
@null_progress
def linearize(config, output: os.PathLike | str, model: Optional[str] = None, *, overwrite: bool = False,
              calib_samples: int = 16, calib_seq_len: int = 512, device: Optional[str] = None,
              dtype: Optional[str] = None, progress: Progress = NULL) -> Path:
    """Distil the model's softmax attention into linear attention (``linearize.distill.LinearizeConfig``):
    per-layer attention transfer on calibration windows, then a LoRA fine-tune on the bundled text with a
    KL loss to the original; a killed run resumes. ``llmcomp.load`` re-installs the student layers."""
    from llmcomp.linearize.distill import LinearizeConfig

    _expect(config, LinearizeConfig, "config", "a LinearizeConfig")
    memory.check_device(device)  # a bad --device fails before any work
    from llmcomp.core import resume
    from llmcomp.core.artifact import llmcomp_version
    from llmcomp.core.data import tokenize
    from llmcomp.linearize import distill

    store_dtype = _store_dtype(dtype, model, progress)
    start = time.perf_counter()
    output, net, tok, base, stages, ids, info = _calibrated(model, output, overwrite, calib_samples, calib_seq_len,
                                                            config.seed, progress, check=distill.check_model)
    # (what the transfer reads: a rerun that changes only the fine-tune's settings keeps the finished transfer)
    key = resume.fingerprint(config=distill.transfer_settings(config), **_job_key(net, ids, default_device(device)),
                             samples=calib_samples, seq_len=calib_seq_len, text=info["text"], version=llmcomp_version())
    distill.check_layers(net, config, calib_seq_len)  # (before the resume directory exists)
    check_window(net, config.seq_len, "Fine-tune")  # (the transfer's windows are checked by _calibrated)
    distill.check_finetune_fits(net, config, default_device(device))
    distill.note_budget(config, progress.note)
    note_equal_batch("--batch-size", config.batch_size, calib_samples, progress.note, " in the attention transfer")
    stream = tokenize(tok, corpus().calib, max_tokens=config.tokens + config.seq_len * config.batch_size)
    check_vocab(stream, net)  # (the calibration windows may miss a rare id the fine-tune's stream holds)
    checkpoint = resume.for_output(output, key, progress.note, default_device(device))
    layout, report = distill.linearize_model(net, ids, stream, config, device=default_device(device),
                                             progress=progress, checkpoint=checkpoint)
    net.to("cpu")
    stage = {"method": f"linearize-{config.method}", "kind": distill.KIND, "config": to_dict(config),
             "student": to_dict(config.spec()), "layout": layout,
             "wall_time_s": round(time.perf_counter() - start + checkpoint.earlier_s, 2),
             "metrics": report, "calibration": info}
    progress.note(f"Writing {output}")
    path = write_artifact(output, net, tok, base_model=base, stages=stages + [stage], text_source=info["text"],
                          overwrite=overwrite, dtype=store_dtype)
    checkpoint.finish()
    return path
