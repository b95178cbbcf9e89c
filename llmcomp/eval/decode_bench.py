"""Decode speed: tokens/s of a compressed model vs its original, at fixed batch and context.

One decode step (a forward of one new token per sequence, greedy pick of the next one) runs over
fixed-shape buffers — a transformers ``StaticCache``, the next tokens [B, 1] and their positions
[B, 1], all updated in place — so it can be captured once in a CUDA graph and replayed: what is timed
is then the model's kernels, not Python and launch overhead (which dominated the older eager script,
bench/kv_decode_gpu.py). Where capture fails, the step runs eagerly and the result says why.

The synthetic model (``synthetic_model``) has Llama-3-8B's shape and random weights built on the GPU
(decode speed does not depend on the weights' values); ``quantize_rtn`` turns it into the W4 g128
model in memory through the project's RTN quantizer, no artifact written; ``random_vq`` gives it VQ layers
with random indices and codebooks (timing only).
"""
from __future__ import annotations

import contextlib
import time
import types
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from llmcomp.core.hfcompat import cache_kwarg
from llmcomp.core.paths import write_json
from llmcomp.core.progress import NULL, Progress
from llmcomp.errors import UserError
from llmcomp.eval.decode_attention import COUNTER_SHARED, NAME, packed_gqa, rope_forward
from llmcomp.eval.decode_attention import kernel as attention_kernel
from llmcomp.kernels.switches import env_switch

SYNTHETIC = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=16384, tie_word_embeddings=False),
    # the bundled model's shape (its GGUF is too large for some GPU machines' uploads; speed does not depend on values)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
}


def synthetic_model(name: str = "llama3-8b", layers: Optional[int] = None, device: str = "cuda",
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM`` of a known shape with random weights (normal, std 0.02), built directly
    on ``device``; ``layers`` keeps only the first N decoder layers (a quick run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SYNTHETIC[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    cfg = LlamaConfig(**shape, initializer_range=0.02)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


SYNTHETIC_FORMATS = ("uniform", "mxfp4", "nvfp4", "vq2", "vq3")
RANDOM_VQ = ("vq2", "vq3")  # random indices and codebooks: timing only (a VPTQ solve of an 8B model takes hours)


def _ignore(lm_head: bool) -> tuple[str, ...]:
    """The layers the synthetic model keeps dense: ``lm_head`` (as ``llmcomp quantize`` does) unless asked."""
    return () if lm_head else ("lm_head",)


def random_vq(model: nn.Module, name: str, progress: Progress = NULL, lm_head: bool = False) -> int:
    """Replace every Linear but ``lm_head`` (with ``lm_head``: every Linear) in place by a ``codebook`` QuantLinear
    with random indices and codebooks (``vq2``: 4-vectors, one 8-bit codebook; ``vq3``: + a 4-bit residual stage) —
    decode speed does not depend on the values, so this times VQ on a shape no one has quantized here. Returns the
    layers replaced."""
    from llmcomp.core.model import set_submodule
    from llmcomp.core.qlinear import QuantLinear
    from llmcomp.core.select import select
    from llmcomp.eval.kernel_bench import codebook_format, random_codebook

    fmt = codebook_format(name)
    targets = list(select(model, ignore=_ignore(lm_head)))  # as the quantizers take them
    for i, (path, lin) in enumerate(progress.track(targets, f"Random {name.upper()} layers")):
        set_submodule(model, path, QuantLinear.from_packed(
            fmt, random_codebook(fmt, lin.out_features, lin.in_features, i, lin.weight.device), lin.in_features,
            bias=lin.bias))
    return len(targets)


def quantize_rtn(model: nn.Module, bits: int = 4, group_size: int = 128, progress: Progress = NULL,
                 fmt: str = "uniform", lm_head: bool = False) -> dict:
    """Quantize every Linear but ``lm_head`` (with ``lm_head``: every Linear) in place by rounding to nearest, as
    ``llmcomp quantize`` does:
    ``uniform`` (asymmetric, ``bits`` / ``group_size``) or an E2M1 format (``mxfp4`` / ``nvfp4``, their spec's
    blocks). Returns the per-layer report."""
    from llmcomp.formats import FORMATS, Uniform
    from llmcomp.quant import quantize_model
    from llmcomp.quant.fp4 import FP4Config
    from llmcomp.quant.rtn import RTNConfig

    ignore = _ignore(lm_head)
    config = (RTNConfig(format=Uniform(bits=bits, group_size=group_size), ignore=ignore) if fmt == "uniform"
              else FP4Config(format=FORMATS.get(fmt)(), ignore=ignore))
    return quantize_model(model, config, progress=progress)


def format_label(fmt: str, bits: int, group_size: int) -> str:
    if fmt in RANDOM_VQ:
        return f"random {fmt.upper()} (timing only)"
    return f"W{bits} g{group_size}" if fmt == "uniform" else fmt.upper()


def synthetic_models(name: str, bits: int, group_size: int, layers: Optional[int], dtype: torch.dtype,
                     progress: Progress = NULL, fmt: str = "uniform", lm_head: bool = False):
    """For ``run``: the random model in ``dtype``, then the same model RTN-quantized in place (``lm_head``: the
    output projection too — on Llama-3-8B 1.05 of a W4 step's 4.8 GB of weights when it stays bf16)."""
    progress.note(f"Building {name} with random weights on the GPU")
    model = synthetic_model(name, layers, dtype=dtype)
    yield "original", f"{name} {_short(dtype)}", model
    head = " + lm_head" if lm_head else ""
    if fmt in RANDOM_VQ:
        random_vq(model, fmt, progress, lm_head)
        yield "compressed", f"{name} {format_label(fmt, bits, group_size)}{head}", model
        return
    quantize_rtn(model, bits, group_size, progress, fmt, lm_head)
    yield "compressed", f"{name} RTN {format_label(fmt, bits, group_size)}{head}", model


def artifact_models(path, original, dtype: torch.dtype, progress: Progress = NULL):
    """For ``run``: the original (``None`` = the bundled model), then the artifact, each loaded onto the
    GPU only while it is timed."""
    from llmcomp import api
    from llmcomp.core.artifact import read_manifest
    from llmcomp.core.model import resolve

    progress.note("Loading the original model")
    model = api.load(original, dtype=dtype, device="cuda")
    yield "original", f"original {_short(dtype)}", model
    del model
    torch.cuda.empty_cache()
    progress.note(f"Loading {path}")
    methods = "+".join(s["method"] for s in read_manifest(resolve(path), verify=False)["stages"])
    model = api.load(path, dtype=dtype, device="cuda")
    yield "compressed", f"{Path(path).name} ({methods})", model


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def argmax_chunk(vocab: int, lo: int = 256, hi: int = 2048) -> Optional[int]:
    """The chunk length of ``greedy_tokens``' first stage: the divisor of ``vocab`` in [lo, hi] nearest its square
    root (None if there is none: a prime vocabulary takes the one-stage argmax)."""
    sizes = [c for c in range(lo, min(hi, vocab - 1) + 1) if vocab % c == 0]
    return min(sizes, key=lambda c: abs(c - vocab ** 0.5)) if sizes else None


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1, keepdim=True)`` [B, 1] in two stages (the maximum of each chunk, then of the chunks):
    torch reduces one row of a 128k vocabulary in one thread block (~28 µs on an H200, ~1 % of a W4 8B step); the
    chunks spread it over the GPU. Equal to ``argmax``, ties included: both stages keep the first maximum."""
    b, v = logits.shape
    c = argmax_chunk(v)
    if c is None:
        return logits.argmax(-1, keepdim=True)
    best, where = logits.reshape(b, v // c, c).max(-1)  # first maximum of each chunk (torch.max's documented tie rule)
    chunk = best.argmax(-1, keepdim=True)
    return chunk * c + where.gather(-1, chunk)


def advance(logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
    """A decode step's tail, in place: the greedy tokens of ``logits`` into ``tokens``, ``positions`` one on. Eager,
    ~6 small kernels (the two argmax stages, the gather and index arithmetic, the copy, the add); ``compiled_layers``'
    ``outer`` compiles it for the model (``ADVANCE``), which ``StaticDecoder`` then runs."""
    tokens.copy_(greedy_tokens(logits))
    positions.add_(1)


# model → its compiled ``advance`` while ``compiled_layers(outer=True)`` is open (weak: a dropped model leaves)
ADVANCE: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()


def shared_position_enabled(share: Optional[bool] = None) -> bool:
    """``share`` where given, else on unless ``LLMCOMP_SHARED_POSITION`` says off (``share_position``; the 8B W4
    step at batch 1 on an H200 1.82 ms with it against 1.88 without, bench/results/kernels_h200_notes.md)."""
    return _switch(share, "LLMCOMP_SHARED_POSITION", True)


def _update_in_place(layer, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
    """transformers' ``StaticLayer.update`` (write the new keys and values at the cache's length) without advancing
    the length: for every layer but the last once they share its counter (``share_position``)."""
    at = torch.arange(key_states.shape[-2], device=layer.device) + layer.cumulative_length
    layer.keys.index_copy_(2, at, key_states)
    layer.values.index_copy_(2, at, value_states)
    return layer.keys, layer.values


def share_position(cache) -> int:
    """Make a ``StaticCache``'s full-attention layers count the cache's length in one device tensor, advanced by the
    last layer only; returns how many layers share it (0: left as it was). Each transformers ``StaticLayer`` advances
    its own counter in place, a kernel of its own at the end of every compiled layer (``triton_poi_fused_add_copy``,
    ~0.5 µs a layer on an H200) for a value all layers hold alike. Only where every layer is an initialized
    ``StaticLayer`` (no sliding-window or indexed ones) at one length."""
    from transformers.cache_utils import StaticLayer

    layers = list(getattr(cache, "layers", ()))
    if len(layers) < 2 or any(type(layer) is not StaticLayer or not layer.is_initialized for layer in layers):
        return 0
    counter = layers[-1].cumulative_length
    if any(not torch.equal(layer.cumulative_length, counter) for layer in layers):
        return 0
    for layer in layers[:-1]:
        layer.cumulative_length = counter
        layer.update = types.MethodType(_update_in_place, layer)
        setattr(layer, COUNTER_SHARED, True)  # (for rope_forward, which writes the cache itself)
    return len(layers)


class StaticDecoder:
    """Greedy decode over fixed-shape buffers, so one ``step`` can be captured in a CUDA graph.

    ``prefill(ids)`` fills the ``StaticCache`` (it tracks its own length in a device tensor that the
    forward advances in place; after the prefill one tensor for all layers, ``share_position``, where ``share``
    or ``shared_position_enabled``) and sets ``tokens`` [B, 1] and ``positions`` [B, 1]; each ``step()``
    then runs the model on ``tokens`` at ``positions``, writes the logits [B, vocab] to ``logits``,
    the argmax to ``tokens`` and advances ``positions`` — all in place, nothing allocated that the
    next step reads.
    """

    def __init__(self, model: nn.Module, batch: int, max_len: int, share: Optional[bool] = None):
        from transformers import StaticCache

        self.share, self.shared = shared_position_enabled(share), 0
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.cache_kw = cache_kwarg(model)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.logits: Optional[torch.Tensor] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._graph_logits: Optional[torch.Tensor] = None
        self._start: Optional[tuple[int, torch.Tensor]] = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """Run the prompts ``ids`` [B, T] through the cache; returns the last position's logits [B, vocab].
        Compiled layers run eagerly here where torch has ``set_stance`` (2.6+): only the decode step is timed,
        so nothing is compiled for the prompt's shapes."""
        if ids.shape[0] != self.batch or ids.shape[1] >= self.max_len:
            raise ValueError(f"prompts {tuple(ids.shape)} do not fit batch {self.batch}, max_len {self.max_len}")
        stance = getattr(torch.compiler, "set_stance", None)
        with stance("force_eager") if stance else contextlib.nullcontext():
            for s in range(0, ids.shape[1], chunk):
                out = self.model(input_ids=ids[:, s:s + chunk], **{self.cache_kw: self.cache}, use_cache=True,
                                 logits_to_keep=1)
        if self.share and not self.shared:
            self.shared = share_position(self.cache)
        last = out.logits[:, -1]
        self.logits = last
        self.tokens.copy_(greedy_tokens(last))
        self.positions.fill_(ids.shape[1])
        self._start = (ids.shape[1], self.tokens.clone())
        return last

    def _body(self) -> None:
        out = self.model(input_ids=self.tokens, position_ids=self.positions, **{self.cache_kw: self.cache},
                         use_cache=True)
        # (B, vocab), no copy: a captured step's logits stay in the graph's memory, rewritten by each replay
        self.logits = out.logits[:, -1]
        ADVANCE.get(self.model, advance)(self.logits, self.tokens, self.positions)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step (graph replay once ``capture`` succeeded); returns ``logits`` [B, vocab]."""
        if self.graph is not None:
            self.graph.replay()
            return self._graph_logits  # (an eager ``_body`` since, e.g. a profiled step, does not replace it)
        self._body()
        return self.logits

    def rewind(self) -> None:
        """Back to the state right after ``prefill`` (the cache keeps the prompt; later slots are rewritten)."""
        length, tokens = self._start
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)
            if hasattr(layer, "cumulative_length_int"):  # sliding-window layers also count on the host
                layer.cumulative_length_int = length
        self.positions.fill_(length)
        self.tokens.copy_(tokens)

    @torch.no_grad()
    def capture(self, warmup: int = 3) -> None:
        """Warm up on a side stream (kernel layouts are prepared and cached on the first call, Triton
        compiles), capture one step, rewind. Raises whatever capture raises; the decoder stays eager then."""
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise RuntimeError("sliding-window cache layers count positions on the host; a graph would freeze them")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body()
        finally:
            torch.cuda.synchronize()
            self.rewind()
        self.graph = graph
        self._graph_logits = self.logits  # the captured step's output, rewritten in place by every replay


# Kernel (GPU) or operator (CPU) name fragments → where a decode step's time goes; first match wins, "other" else.
TIME_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # first: llmcomp::decode_attention is not a linear
    ("quantized linears", ("uniform_mma", "uniform_dequant", "_gemv_kernel", "_dequant_kernel", "_cb_gemv",
                           "llmcomp::", "llmcomp_lut::", "llmcomp_mma::")),
    ("dense GEMM", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
)


# inductor's generated pointwise / reduction kernels: named after every op they fused (a norm fused with the
# output of ``llmcomp::codebook_gemm`` reads "..._codebook_gemm_..._rsqrt_..."), never a matrix product
INDUCTOR_FUSED = ("triton_poi_", "triton_red_", "triton_per_")


def time_kind(name: str) -> str:
    low = name.lower()
    if low.startswith(INDUCTOR_FUSED):
        return "other"
    return next((kind for kind, parts in TIME_KINDS if any(p in low for p in parts)), "other")


QLINEAR_SCOPE = "llmcomp.qlinear"


def _scoped(fn):
    def forward(*args, **kwargs):
        with torch.profiler.record_function(QLINEAR_SCOPE):
            return fn(*args, **kwargs)
    return forward


@torch.no_grad()
def kernel_breakdown(dec: "StaticDecoder", steps: int = 2, top: int = 12) -> dict:
    """Where an eager decode step's time goes, from ``torch.profiler`` over ``steps`` steps, after which the
    decoder is rewound to the state right after its prefill. On a GPU each kernel's device time, on a CPU each
    operator's own time: everything launched inside a quantized linear (its forward runs in a profiler scope
    meanwhile) counts as "quantized linears", the rest by name (``TIME_KINDS``); with the kernels (operators) a
    step and the ``top`` most expensive. A CUDA-graph replay runs the same kernels with fewer gaps between them,
    so this says what the kernels cost, not the launch overhead the graph removes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from llmcomp.core.qlinear import QuantLinear

    cuda = dec.device.type == "cuda"
    with swapped_forwards() as swap:
        for mod in dec.model.modules():
            if isinstance(mod, QuantLinear):
                swap(mod, _scoped(mod.forward))
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(steps):
                dec._body()
            if cuda:
                torch.cuda.synchronize()
    dec.rewind()
    events = prof.events()
    scopes = [(e.thread, e.time_range.start, e.time_range.end) for e in events if e.name == QLINEAR_SCOPE]

    def kind(e, name: str) -> str:
        inside = any(t == e.thread and a <= e.time_range.start <= b for t, a, b in scopes)
        return "quantized linears" if inside else time_kind(name)

    costs: dict[tuple[str, str], list] = {}  # (name, kind) → [calls, µs]
    for e in events:
        if e.device_type != DeviceType.CPU or e.name == QLINEAR_SCOPE:
            continue
        if cuda:  # the kernels each operator launched
            items = [(k.name, k.duration) for k in e.kernels]
        elif e.name.startswith(("aten::", "llmcomp::")):
            items = [(e.name, e.self_cpu_time_total)]
        else:
            items = []
        for name, us in items:
            c = costs.setdefault((name, kind(e, name)), [0, 0.0])
            c[0] += 1
            c[1] += us
    by_kind: dict[str, float] = {}
    for (_, k), (_, us) in costs.items():
        by_kind[k] = by_kind.get(k, 0.0) + us
    ranked = sorted(costs.items(), key=lambda kv: -kv[1][1])
    return {"profiled_steps": steps, "unit": "GPU kernels" if cuda else "CPU operators",
            "per_step": round(sum(c[0] for c in costs.values()) / steps, 1),
            "ms_per_step": {k: round(v / steps / 1e3, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": name[:160], "kind": k, "calls_per_step": round(n / steps, 2),
                     "us_per_step": round(us / steps, 2)} for (name, k), (n, us) in ranked[:top]]}


def check_positions(limit: int, context: int, steps: int, warmup: int = 3) -> None:
    """The static cache holds the prompt, the warm-up and timed steps and one more position; past the model's context
    (``limit`` tokens, 0: unknown) the steps would run on positions it has no rotary training for — refused."""
    need = context + steps + warmup + 1
    if limit and need > limit:
        raise UserError(f"--context {context} and --steps {steps} take {need} positions ({warmup} warm-up steps and "
                        f"the cache's spare one), more than the model's context ({limit} tokens); lower them.")


@torch.no_grad()
def decode_speed(model: nn.Module, batch: int, context: int, steps: int, graphs: bool = True, warmup: int = 3,
                 seed: int = 0, breakdown: bool = False, share: Optional[bool] = None) -> dict:
    """Tokens/s of greedy decode at ``batch`` sequences after a ``context``-token random prompt.

    Returns ``tokens_per_s``, ``ms_per_step`` (total time / steps), ``peak_gpu_gb`` (peak
    allocated during the measurement, weights included; None on CPU), ``graphs`` (whether the timed
    steps were CUDA-graph replays) and, when capture failed, ``graph_error``. On CPU the steps run eagerly
    and are timed with the wall clock. ``breakdown``: also ``breakdown`` (``kernel_breakdown`` of eager steps,
    after the timing); ``shared_position``: how many cache layers count the length in one tensor (``share``:
    ``StaticDecoder``'s).
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    from llmcomp.api import config_context

    check_positions(config_context(model.config), context, steps, warmup)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    dec = StaticDecoder(model, batch, context + steps + warmup + 1, share)
    dec.prefill(ids)
    result = {"batch": batch, "context": context, "steps": steps, "graphs": False, "shared_position": dec.shared}
    if graphs and not cuda:
        result["graph_error"] = "CUDA graphs need a CUDA device"
    elif graphs:
        try:
            dec.capture(warmup)
            result["graphs"] = True
        except Exception as exc:  # any capture failure: time eagerly, say why
            text = str(exc).strip()
            result["graph_error"] = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
    for _ in range(warmup):  # eager: layouts and compilation; graph: the first replays (upload)
        dec.step()
    dec.rewind()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            dec.step()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) * 1e-3
    else:
        t = time.perf_counter()
        for _ in range(steps):
            dec.step()
        seconds = time.perf_counter() - t
    result.update(tokens_per_s=round(batch * steps / seconds, 2), ms_per_step=round(1e3 * seconds / steps, 4),
                  peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None)
    if breakdown:
        dec.rewind()  # the profiled steps at the timed steps' positions (the cache has room for them)
        result["breakdown"] = kernel_breakdown(dec)
        if result["graphs"]:
            from llmcomp.eval.graph_timeline import graph_timeline

            # from the rewound position: at most the steps the cache has room for after the prompt
            result["graph_timeline"] = graph_timeline(dec.graph.replay, time_kind, steps=min(3, steps + warmup + 1))
            dec.rewind()
    del dec
    if cuda:
        torch.cuda.empty_cache()
    return result


_NO_FORWARD = object()


# Linears of one decoder layer that read the same input: with ``fuse`` their weights are stacked into one kernel call.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@contextlib.contextmanager
def compiled_layers(model: nn.Module, backend="inductor", frozen: bool = True, fuse: bool = True, pdl: bool = False,
                    span: int = 1, options: Optional[dict] = None, glu: Optional[bool] = None,
                    norm: Optional[bool] = None, outer: Optional[bool] = None, rope: Optional[bool] = None):
    """While open: every decoder layer's forward through ``torch.compile`` (static shapes); yields
    ``{"layers": compiled, "frozen": quantized linears traced, "fused": groups of them stacked}``. HF's eager layer
    launches ~40 small kernels (norms in fp32 steps, rotary, residuals) that cost more than a W4 layer's weights at
    batch 1; compiled, they fuse. A quantized linear with a fast kernel is traced as that kernel's one opaque op
    over its prepared layout (``QuantLinear.frozen_forward``; ``frozen=False``: never), so the layer stays one graph;
    any other is kept out of dynamo (``torch.compiler.disable``: a graph break each instead of a resume function
    per input stride).
    ``fuse`` (with ``frozen``): siblings that read the same input (``SIBLINGS``: q/k/v, gate/up) share one call over
    their stacked weights (``qlinear.frozen_group``; ``info["fused"]`` counts the groups).
    ``pdl``: programmatic dependent launch for the step's kernels while open (``dependent_launch``: ours and
    inductor's Triton kernels, where both exist; ``info["pdl"]`` says whether it is on).
    ``span``: consecutive decoder layers compiled as one graph (``layer_spans``), so the residual add a layer ends
    with can fuse into the next layer's norm instead of being a kernel of its own at every graph's end;
    ``info["graphs"]`` counts the groups compiled (a linear kept out of dynamo still breaks its group's graph).
    ``options``: inductor's config for these graphs (``torch.compile``'s ``options``; ``inductor_options`` parses
    and checks them), over ``INDUCTOR_DEFAULTS`` (``compile_options`` merges them).
    ``glu`` (with ``frozen`` and ``fuse``; default: on unless ``LLMCOMP_GLU=0``): a gated MLP (``gate_proj``,
    ``up_proj``, ``down_proj``, SiLU) runs its gate and up projections and the activation as one kernel call with the
    activation in its epilogue (``qlinear.frozen_glu``) at decode sizes; ``info["glu"]`` counts them.
    ``norm`` (with ``glu``; default: on unless ``LLMCOMP_NORM_SPLIT=0``): Llama-style layers' RMSNorms split
    into the epilogues of the kernel calls around them (``norm_split.split_norms``: the post-attention norm between
    o and the GLU call, and the next layer's input norm between down and q/k/v, with the residual adds), no kernel
    of their own at decode sizes; ``info["norm_split"]`` counts the norms split.
    ``outer`` (default: on unless ``LLMCOMP_COMPILE_OUTER=0``): the model's rotary embedding and final norm, which
    run between the layers' graphs (~12 small kernels a step eager), compiled too (``OUTER``), and so is the step's
    tail (``advance``: argmax, token copy, position add) for ``StaticDecoder``s of this model, and the causal mask's
    function (``MASK``) where the body's modeling module calls one (set there while open); ``info["outer"]`` counts
    them (4 for Llama).
    ``rope`` (default: off unless ``LLMCOMP_ROPE_ATTENTION=1``; measured no faster): Llama-style attention modules'
    decode step runs the rotary embedding, the cache write and the attention as one kernel launch
    (``decode_attention.rope_forward``); ``info["rope"]`` counts them.
    On exit every swapped ``forward`` is put back as it was (instance attributes such as accelerate's hooks
    included), dynamo's cache limits are restored and ``torch._dynamo.reset()`` drops the compiled code —
    every compiled frame of the process, not only these layers'."""
    import torch._dynamo

    from llmcomp.core.model import decoder_layers
    from llmcomp.core.norm_split import split_norms
    from llmcomp.core.qlinear import QuantLinear, frozen_glu, frozen_group

    path, layers = decoder_layers(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = embed.weight.dtype if embed is not None else next(model.parameters()).dtype
    cfg = torch._dynamo.config
    limits = cfg.cache_size_limit, cfg.accumulated_cache_size_limit
    info = {"layers": len(layers), "frozen": 0, "fused": 0, "pdl": False, "graphs": 0, "glu": 0, "norm_split": 0,
            "outer": 0, "rope": 0}
    glu = glu_enabled(glu)
    norm = glu and norm_split_enabled(norm)
    masks, mask_fn = None, None  # (outer: the modeling module whose causal-mask function was swapped, and it)
    try:
        with swapped_forwards() as swap, dependent_launch(pdl and backend == "inductor") as info["pdl"]:
            limit = 4 * len(layers) + 8  # one entry per layer and shape, should the guards tell the layers apart
            cfg.cache_size_limit = max(cfg.cache_size_limit, limit)
            cfg.accumulated_cache_size_limit = max(cfg.accumulated_cache_size_limit, 4 * limit)
            for layer in layers:
                grouped = set()
                glued = set()  # gate/up of the MLPs swapped for their GLU call: not stacked as siblings too
                for mlp in list(layer.modules()) if frozen and fuse and glu else ():
                    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
                    if not isinstance(down, nn.Module) or not _is_silu(getattr(mlp, "act_fn", None)):
                        continue
                    fn = frozen_glu(gate, up, dtype)
                    if fn is not None:
                        swap(mlp, _glu_forward(mlp, fn, dtype, gate.in_features))
                        glued |= {id(gate), id(up)}
                        info["glu"] += 1
                for where, parent in layer.named_modules() if frozen and fuse else ():
                    if "cross" in where.lower() or "encoder_attn" in where:  # k/v read another input there
                        continue
                    for names in SIBLINGS:
                        mods = [getattr(parent, n, None) for n in names]
                        if any(id(m) in glued for m in mods):
                            continue
                        fns = frozen_group(mods, dtype) if all(isinstance(m, QuantLinear) for m in mods) else None
                        for mod, fn in zip(mods, fns or ()):
                            swap(mod, fn)
                            grouped.add(id(mod))
                        info["frozen"] += len(fns or ())
                        info["fused"] += fns is not None
                for mod in layer.modules():
                    if isinstance(mod, QuantLinear) and id(mod) not in grouped:
                        # (a glued gate/up is left unprepared: its GLU call serves every row count)
                        fn = mod.frozen_forward(dtype) if frozen and id(mod) not in glued else None
                        info["frozen"] += fn is not None
                        swap(mod, fn or torch.compiler.disable(mod.forward))
            if norm:
                swaps, info["norm_split"] = split_norms(layers, dtype)
                for mod, fn in swaps:
                    swap(mod, fn)
            for layer in layers if rope_attention_enabled(rope) else ():
                fn = rope_forward(getattr(layer, "self_attn", None))
                if fn is not None:
                    swap(layer.self_attn, fn)
                    info["rope"] += 1
            inductor_config = compile_options(options) if backend == "inductor" else None  # (inductor's alone)
            for group in layer_spans(layers, span, getattr(model, "config", None)):
                # the layers' forwards as they are now (an instance forward, e.g. accelerate's hook, included)
                fn = group[0].forward if len(group) == 1 else _chained([layer.forward for layer in group])
                swap(group[0], torch.compile(fn, dynamic=False, backend=backend, options=inductor_config))
                for layer in group[1:]:
                    swap(layer, _passthrough)
                info["graphs"] += 1
            if outer_enabled(outer):
                parent = model.get_submodule(path.rpartition(".")[0])  # ("": the model itself)
                for name in OUTER:
                    mod = getattr(parent, name, None)
                    if isinstance(mod, nn.Module):
                        swap(mod, torch.compile(mod.forward, dynamic=False, backend=backend, options=inductor_config))
                        info["outer"] += 1
                ADVANCE[model] = torch.compile(advance, dynamic=False, backend=backend, options=inductor_config)
                info["outer"] += 1
                masks = _modeling_module(parent)
                if callable(getattr(masks, MASK, None)):
                    mask_fn = getattr(masks, MASK)
                    setattr(masks, MASK, torch.compile(mask_fn, dynamic=False, backend=backend,
                                                       options=inductor_config))
                    info["outer"] += 1
            yield info
    finally:
        ADVANCE.pop(model, None)
        if mask_fn is not None:
            setattr(masks, MASK, mask_fn)
        cfg.cache_size_limit, cfg.accumulated_cache_size_limit = limits
        torch._dynamo.reset()


# Inductor options the compiled layers take unless told otherwise (``--inductor-option KEY=VALUE`` overrides one):
# combo kernels (independent kernels of a graph launched as one: a layer's q/k norm-and-rotary pieces, the cache
# writes) — the compiled W4 8B step at batch 1 on an H200 in 2.07 ms with them against 2.15 without, 417 kernels a
# replayed step against 481 (bench/results/decode_h200_32layers_uniform_lmhead_{combo,timeline}_compiled.json; the
# first compiled step's logits as without them, within rounding, tests/test_decode_bench.py).
INDUCTOR_DEFAULTS = {"combo_kernels": True}


def compile_options(options: Optional[dict] = None) -> dict:
    """``INDUCTOR_DEFAULTS`` that this torch's inductor has, overridden by ``options``."""
    import torch._inductor.config as inductor

    known = inductor.get_config_copy()
    return {**{k: v for k, v in INDUCTOR_DEFAULTS.items() if k in known}, **(options or {})}


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _switch(given: Optional[bool], variable: str, default: bool) -> bool:
    """``given`` where given, else the environment ``variable`` (``env_switch``), else ``default``."""
    if given is not None:
        return given
    found = env_switch(variable)
    return default if found is None else found


# The modules of a decoder's body that run between the layers' graphs each step, compiled with ``outer``.
OUTER = ("rotary_emb", "norm")
# The function that builds the layers' causal mask each step (~7 small kernels eager: aranges, adds, a compare),
# looked up by the body's forward in its modeling module's namespace, compiled there with ``outer``.
MASK = "create_causal_mask"


def _modeling_module(body: nn.Module):
    """The module that defines ``body``'s class (e.g. ``transformers.models.llama.modeling_llama``), if imported."""
    import sys

    return sys.modules.get(type(body).__module__)


def outer_enabled(outer: Optional[bool] = None) -> bool:
    """``outer`` where given, else on unless ``LLMCOMP_COMPILE_OUTER`` says off (``compiled_layers``; the 8B W4 step
    at batch 1 on an H200 1.80 ms with it and the shared counter against 1.82 with the counter alone)."""
    return _switch(outer, "LLMCOMP_COMPILE_OUTER", True)


def rope_attention_enabled(rope: Optional[bool] = None) -> bool:
    """``rope`` where given, else off unless ``LLMCOMP_ROPE_ATTENTION`` says on (``decode_attention.rope_forward``;
    opt-in: the 8B W4 step at batch 1 on an H200 1.790 ms with it against 1.798 without, docs/kernels.md)."""
    return _switch(rope, "LLMCOMP_ROPE_ATTENTION", False)


def glu_enabled(glu: Optional[bool] = None) -> bool:
    """``glu`` where given, else on unless ``LLMCOMP_GLU`` says off."""
    return _switch(glu, "LLMCOMP_GLU", True)


def norm_split_enabled(norm: Optional[bool] = None) -> bool:
    """``norm`` where given, else on unless ``LLMCOMP_NORM_SPLIT`` says off (the 8B W4 step 1.91 ms against 1.95
    unsplit, H200: kernels_h200_notes.md, nineteenth session)."""
    return _switch(norm, "LLMCOMP_NORM_SPLIT", True)


def _glu_forward(mlp: nn.Module, glu_fn, dtype: torch.dtype, k: int):
    """A gated MLP's forward through its GLU call (``frozen_glu``: the kernel at decode sizes, the interleaved weight
    dequantized above) for ``dtype`` inputs, then its down projection; inputs of another dtype take the forward it
    had."""
    eager, down = mlp.forward, mlp.down_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != dtype:
            return eager(x)
        return down(glu_fn(x))

    forward.call = getattr(glu_fn, "call", None)  # (norm_split: the GLU call)
    return forward


def _option_type(inductor, key: str, default) -> tuple[type, bool]:
    """An inductor option's declared scalar type and whether it may be None (``int | None`` → (int, True)); the
    default's type where the config module cannot say. ValueError for lists, dicts, callables."""
    import types
    import typing

    declared = inductor.get_type(key) if hasattr(inductor, "get_type") else type(default)
    parts = typing.get_args(declared) if typing.get_origin(declared) in (typing.Union, types.UnionType) else (declared,)
    scalar = [t for t in parts if t is not type(None)]
    if len(scalar) != 1 or scalar[0] not in (bool, int, float, str):
        raise ValueError(f"{key} is of type {declared}; only bool, int, float and text options can be set here")
    return scalar[0], len(scalar) < len(parts)


def inductor_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings → inductor config options for ``compiled_layers``: KEY one of
    ``torch._inductor.config``'s (dotted for nested ones, ``triton.max_tiles``), VALUE parsed as the option's declared
    type (true/false, a number, text; ``none`` where the option may be None). ValueError names the first bad pair."""
    import torch._inductor.config as inductor

    known = inductor.get_config_copy()
    options = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or key not in known:
            raise ValueError(f"{pair!r} is not KEY=VALUE with KEY an inductor option (torch._inductor.config)")
        kind, nullable = _option_type(inductor, key, known[key])
        try:
            if nullable and text.lower() == "none":
                value = None
            elif kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = text.lower() in ("true", "1")
            else:
                value = kind(text)
        except ValueError:
            raise ValueError(f"{key} takes {kind.__name__}{' or none' if nullable else ''}, got {text!r}") from None
        options[key] = value
    return options


# Architectures whose decoder loop hands every layer the same arguments, or picks them by the layer's type only
# (``config.layer_types``: sliding-window or full attention, with its mask and, for Gemma 3, its rotary values), so
# a group of same-type layers can run on its first layer's arguments. Others (Gemma 3n's per-layer inputs, a rope
# theta a layer, ...) could get a wrong answer silently and are refused.
SPAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3",
                    "smollm3")


def layer_spans(layers, span: int, config=None) -> list[list[nn.Module]]:
    """Consecutive decoder layers in groups of up to ``span``, each group compiled as one graph. The group's first
    layer's arguments serve the whole group, so a group never mixes layer types (``config.layer_types``, else a
    layer's ``attention_type``): sliding-window and full layers get different masks (and rotary values) from the
    model's loop. ``span`` > 1 needs a ``config`` of a ``SPAN_MODEL_TYPES`` architecture (UserError otherwise)."""
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if span == 1:
        return [[layer] for layer in layers]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type not in SPAN_MODEL_TYPES:
        raise UserError(f"--layers-per-graph above 1 supports {', '.join(SPAN_MODEL_TYPES)} models; this one is "
                        f"{model_type!r}: use --layers-per-graph 1.")
    types = list(getattr(text, "layer_types", None) or [getattr(layer, "attention_type", None) for layer in layers])
    if len(types) < len(layers):
        raise UserError(f"config.layer_types names {len(types)} layers but the model has {len(layers)}: use "
                        f"--layers-per-graph 1.")
    groups: list[list[nn.Module]] = []
    group_type = None
    for layer, kind in zip(layers, types):
        if groups and len(groups[-1]) < span and kind == group_type:
            groups[-1].append(layer)
        else:
            groups.append([layer])
            group_type = kind
    return groups


def _chained(forwards):
    """One decoder layer's call that runs several in turn with the same arguments (``layer_spans``)."""
    def forward(hidden_states, *args, **kwargs):
        for f in forwards:
            hidden_states = f(hidden_states, *args, **kwargs)
            if isinstance(hidden_states, tuple):  # layers of older transformers return (hidden_states, ...)
                raise TypeError("layer_span > 1 needs decoder layers that return the hidden states alone")
        return hidden_states
    return forward


def _passthrough(hidden_states, *args, **kwargs):
    """The forward of a decoder layer that an earlier layer's compiled graph has already run. (Hooks on the layer,
    e.g. transformers' hidden-state capture, would see the group's output here; the decode bench asks for none.)"""
    return hidden_states


@contextlib.contextmanager
def dependent_launch(on: bool = True):
    """While open: the quantized GEMMs (``uniform_cuda.set_dependent_launch``) and inductor's Triton kernels
    (``torch._inductor.config.triton.enable_pdl``, read when a graph is compiled) launch with programmatic dependent
    launch, so each kernel of a decode step may start while the previous one finishes — only where both exist
    (sm_90+, the CUDA extension, a torch that has the option): ours alone made the compiled 8B step slower, both
    together faster (H200, batch 1: 2.43 against 2.53 ms; ours alone 2.60, inductor's alone 2.49 —
    bench/results/decode_h200_ab_inductor_pdl.json). Yields whether both are on (``on=False``: as they stand, left
    alone); restores the settings after. The decode attention's kernels launch as dependents too while it is on
    (``decode_attention.ATTN_PDL``, unless ``LLMCOMP_ATTN_PDL=0``): the step 2.01 ms against 2.07 with them launched
    plainly (H200, W4 8B, batch 1, combo kernels; bench/results/decode_h200_32layers_uniform_lmhead_combo{_attnpdl,}
    _compiled.json: the GPU idle 0.038 ms a step against 0.067)."""
    import torch._inductor.config as inductor

    from llmcomp.kernels import decode_attention, uniform_cuda

    ours = uniform_cuda.dependent_launch() if torch.cuda.is_available() else None
    has = hasattr(inductor.triton, "enable_pdl")
    if not on or ours is None or not has or torch.cuda.get_device_capability()[0] < 9:
        yield bool(ours) and has and bool(inductor.triton.enable_pdl)
        return
    before, attention = inductor.triton.enable_pdl, decode_attention.ATTN_PDL
    try:
        inductor.triton.enable_pdl = True
        decode_attention.ATTN_PDL = env_switch("LLMCOMP_ATTN_PDL") is not False
        yield bool(uniform_cuda.set_dependent_launch(True))
    finally:
        inductor.triton.enable_pdl, decode_attention.ATTN_PDL = before, attention
        uniform_cuda.set_dependent_launch(ours)


def attention_pdl() -> bool:
    """Whether the decode attention's kernels launch as programmatic dependents now (``decode_attention.ATTN_PDL``
    on a GPU that has it)."""
    from llmcomp.kernels import decode_attention

    return torch.cuda.is_available() and decode_attention.dependent_launch(torch.device("cuda"))


@contextlib.contextmanager
def swapped_forwards():
    """Yields ``swap(module, fn)``, which sets ``module.forward = fn``; on exit every swapped ``forward`` is put
    back as it was (instance attributes such as accelerate's hooks included), last swapped first."""
    swapped: list = []

    def swap(mod: nn.Module, fn) -> None:
        swapped.append((mod, mod.__dict__.get("forward", _NO_FORWARD)))
        mod.forward = fn

    try:
        yield swap
    finally:
        for mod, previous in reversed(swapped):
            if previous is _NO_FORWARD:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = previous


def environment() -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        from llmcomp.kernels import decode_attention, uniform_cuda

        env["dependent_launch"] = uniform_cuda.dependent_launch()
        env["mma_lean"] = uniform_cuda.lean()  # (kernel switches A/B-timed by environment variable)
        env["mma_scale_early"] = uniform_cuda.scale_early()
        env["mma_e2m1_lean"] = uniform_cuda.e2m1_lean()
        env["mma_scale_early16"] = uniform_cuda.scale_early16()
        env["mma_scale_pair"] = uniform_cuda.scale_pair()
        env["attention_trigger_first"] = decode_attention.ATTN_EARLY
        env["mma_launch_override"] = {f"{n}x{k}": list(c) for (n, k), c in uniform_cuda.launch_override().items()}
    return env


def run(models, batches: list[int], context: int, steps: int, settings: dict, out: Optional[Path] = None,
        graphs: bool = True, progress: Progress = NULL, compile: bool = False, breakdown: bool = False,
        frozen: bool = True, pack_gqa: bool = True, fuse: bool = True, pdl: bool = False, span: int = 1,
        options: Optional[dict] = None, glu: Optional[bool] = None, norm: Optional[bool] = None) -> dict:
    """Time every model at every batch size. ``models`` yields ``(name, label, model)`` one at a time
    (so only one model need be on the GPU at once; ``name`` is ``original`` or ``compressed``).
    ``compile``: each model timed with its decoder layers compiled (``compiled_layers``; both models alike;
    ``frozen``: quantized linears traced as their kernels, else kept out of dynamo; ``pdl``: with dependent launch,
    ``dependent_launch``, where it exists — the row's ``dependent_launch`` says). ``pack_gqa``: both models
    attend through ``decode_attention.packed_gqa`` (no copies of K/V for grouped-query heads), else transformers'.
    ``breakdown``: each row also says where a step's time goes (``kernel_breakdown``). ``options``: inductor's
    config for the compiled layers (``compiled_layers``); ``glu``: gated MLPs as one GLU call (``compiled_layers``;
    None: ``glu_enabled``'s default); ``norm``: the layers' RMSNorms split into the kernels' epilogues
    (``compiled_layers``; None: ``norm_split_enabled``'s default).
    Writes ``out`` after every row: a run cut short still leaves its numbers."""
    result = {**environment(), "settings": {**settings, "batches": batches, "context": context, "steps": steps,
                                            "compile": compile,
                                            **({"frozen": frozen, "fuse": fuse, "pdl": pdl, "layer_span": span,
                                                "glu": frozen and fuse and glu_enabled(glu),  # (as compiled_layers)
                                                "norm_split": frozen and fuse and glu_enabled(glu)
                                                and norm_split_enabled(norm),
                                                "compile_outer": outer_enabled(),
                                                "rope_attention": rope_attention_enabled(),
                                                "inductor_options": compile_options(options)}
                                               if compile else {}),
                                            "pack_gqa": pack_gqa, "shared_position": shared_position_enabled()},
              "rows": []}
    for name, label, model in models:
        with packed_gqa(model, pack_gqa) as packed, \
                compiled_layers(model, frozen=frozen, fuse=fuse, pdl=pdl, span=span, options=options, glu=glu,
                                norm=norm) \
                if compile \
                else contextlib.nullcontext() as compiled:
            if compile:
                progress.note(f"Compiling the {compiled['layers']} decoder layers of {label} as {compiled['graphs']} "
                              f"graphs (first step of each batch; {compiled['frozen']} quantized linears traced as "
                              f"their kernels)")
            for b in batches:
                try:
                    row = {"model": name, "label": label, **decode_speed(model, b, context, steps, graphs=graphs,
                                                                                  breakdown=breakdown)}
                    row["attention"] = NAME if packed else "transformers"
                    if packed:
                        row["attention_kernel"] = attention_kernel()
                    if compile:
                        row["frozen_linears"] = compiled["frozen"]
                        row["fused_groups"] = compiled["fused"]
                        row["dependent_launch"] = compiled["pdl"]
                        row["attention_pdl"] = attention_pdl()
                        row["compiled_graphs"] = compiled["graphs"]
                        row["glu_mlps"] = compiled["glu"]
                        row["norm_splits"] = compiled["norm_split"]
                        row["outer_compiled"] = compiled["outer"]
                        row["rope_attention"] = compiled["rope"]
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = {"model": name, "label": label, "batch": b, "error": "out of GPU memory"}
                except Exception as exc:  # a compiler that cannot build here (no C++ compiler, old triton, ...)
                    if not compile:
                        raise
                    root = exc
                    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
                        root = inner  # dynamo wraps the backend's own error
                    text = str(root).strip().splitlines()
                    row = {"model": name, "label": label, "batch": b, "error": "torch.compile failed: "
                           f"{type(root).__name__}: {text[0][:200] if text else ''}"}
                result["rows"].append(row)
                progress.note(_line(row))
                if out is not None:
                    write_json(out, result, partial=True)
        del model  # the generator drops its reference too before it loads the next model
    result["speedup"] = speedups(result["rows"])
    if out is not None:
        write_json(out, result)
    return result


def speedups(rows: list[dict]) -> dict:
    """Compressed tokens/s over original tokens/s, per batch size (``{"1": 2.9, ...}``)."""
    speed = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    return {str(b): round(speed[("compressed", b)] / speed[("original", b)], 3)
            for (m, b) in speed if m == "compressed" and ("original", b) in speed}


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['label']} batch {row['batch']}: {row['error']}"
    mode = "CUDA graph" if row["graphs"] else f"eager ({row.get('graph_error', 'graphs off')})"
    line = (f"{row['label']} batch {row['batch']}: {row['tokens_per_s']:.1f} tokens/s, "
            f"{row['ms_per_step']:.3f} ms/step, {mode}")
    if "breakdown" in row:
        b = row["breakdown"]
        line += (f"; eager step: {b['per_step']:.0f} {b['unit']}, "
                 + ", ".join(f"{k} {v:.3f} ms" for k, v in b["ms_per_step"].items()))
    t = row.get("graph_timeline")
    if t is not None:
        line += (f"; graph step: {t['error']}" if "error" in t else
                 f"; graph step: {t['kernels_per_step']:.0f} kernels, GPU busy {t['busy_ms']:.3f} ms, "
                 f"idle {t['idle_ms']:.3f} ms")
    return line
