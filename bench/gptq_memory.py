"""GPTQ memory on the GPU under a hard cap below the model's size, and a placed load+eval of the result.

    python bench/gptq_memory.py --out $OUT/gptq_memory_h200.json       # GPU machine
    python bench/gptq_memory.py --tiny --out /tmp/gptq_memory_tiny.json  # CPU smoke test of the script

For each Llama shape (random weights from a config, no download; the default is the 1.7 B-parameter one):
1. capped: GPTQ W4 g128 act-order, the model in CPU memory and one decoder layer at a time on the GPU, under
   ``--max-memory cuda:0=CAP`` (``core.memory.gpu_cap``: this process's CUDA allocator may not reserve more)
   for each CAP of ``--cap`` (default 2GiB,1.5GiB: below the 3.48 GB fp16 model); a run that does not fit
   records its one-line error;
2. the first capped run's artifact loaded with ``device_map="auto"`` and a GPU weights budget smaller than
   the artifact (the rest on CPU): where the layers went, perplexity on random tokens, max |Δlogit| against
   the artifact loaded whole on the GPU;
3. reference: the same weights (same seed) quantized without a cap; ``identical_to_reference`` compares the
   quantized tensors (sha256) with each capped run's.
Records parameters and fp16 size, each cap, peak GPU memory (max_memory_allocated; split into the peak
inside the per-linear GPTQ solves and the rest; also the peak reserved), peak CPU RSS of the process
(sampled every 20 ms) and wall times.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from llmcomp.core import memory
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.quant import quantize_model
from llmcomp.quant.gptq import GPTQConfig, GPTQQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

SHAPES = {  # name: (config, GPU caps for the quantize runs, GPU weights budget for the placed eval)
    "llama-1.7b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=16, vocab_size=32000), "2GiB,1.5GiB", "512MiB"),
    "smollm2-135m-shape": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), "192MiB", "64MiB"),
}
TINY = {"tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256), "64MiB,32MiB", "150KiB")}
GB = 1e9


def build(shape: dict, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device("cpu"):
        return LlamaForCausalLM(cfg).to(dtype).eval()


class RSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak, self._stop = self._now(), threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._now())

    @staticmethod
    def _now() -> int:
        import os

        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._now())


class PhasePeaks:
    """Peak GPU memory inside GPTQ's per-linear solves vs. everywhere else (forward passes, moves)."""

    def __init__(self, cuda: bool):
        self.cuda, self.solve, self.other, self.reserved, self.where = cuda, 0, 0, 0, None

    def _cut(self) -> int:
        peak = torch.cuda.max_memory_allocated()
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()
        return peak

    def __enter__(self):
        if not self.cuda:
            return self
        self._orig = GPTQQuantizer.quantize_linear
        phases = self

        def wrapped(quantizer, name, linear, stats=None):
            phases.other = max(phases.other, phases._cut())
            try:
                return phases._orig(quantizer, name, linear, stats)
            finally:
                peak = phases._cut()
                if peak > phases.solve:
                    phases.solve, phases.where = peak, name

        GPTQQuantizer.quantize_linear = wrapped
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            GPTQQuantizer.quantize_linear = self._orig
            self.other = max(self.other, self._cut())

    @property
    def peak(self) -> int:
        return max(self.solve, self.other)


def digest(model) -> str:
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantize_run(model, ids, device: str, cap: int | None) -> dict:
    cuda = device == "cuda"
    limits = {0: cap} if (cap is not None and cuda) else {}
    row: dict = {}
    with RSS() as rss, PhasePeaks(cuda) as phases:
        t = time.perf_counter()
        try:
            with memory.gpu_cap(limits):
                quantize_model(model, GPTQConfig(format=Uniform(bits=4, group_size=128)), ids, device=device)
        except UserError as exc:
            row["error"] = str(exc)
        if cuda:
            torch.cuda.synchronize()
        row["wall_s"] = round(time.perf_counter() - t, 1)
    if cuda:
        row.update(peak_gpu_gb=round(phases.peak / GB, 3), peak_gpu_solve_gb=round(phases.solve / GB, 3),
                   peak_gpu_solve_layer=phases.where, peak_gpu_other_gb=round(phases.other / GB, 3),
                   peak_gpu_reserved_gb=round(phases.reserved / GB, 3))
    row["peak_cpu_rss_gb"] = round(rss.peak / GB, 3)
    if "error" not in row:
        row["weights_sha256"] = digest(model)
    return row


@torch.no_grad()
def placed_eval(path: Path, device: str, budget: int, windows: torch.Tensor, offload: Path) -> dict:
    """Load the artifact under a weights budget (``device_map="auto"``), score random windows, compare
    logits with the artifact loaded whole on ``device``."""
    import llmcomp

    full = llmcomp.load(path, device=device)
    ref = [full(input_ids=w[None].to(device)).logits.float().cpu() for w in windows[:2]]
    del full
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # GPU budget on the GPU machine; on CPU the budget is for CPU and the rest goes to disk
    limits = {0: budget, "cpu": 64 << 30} if cuda else {"cpu": budget}
    t = time.perf_counter()
    net = llmcomp.load(path, max_memory=limits, offload_folder=str(offload))
    load_s = time.perf_counter() - t
    where: dict[str, list] = {}
    for name, d in net.hf_device_map.items():
        where.setdefault(memory.format_device(d) if isinstance(d, int) else str(d), []).append(name)
    dev = memory.input_device(net)
    nll, count, diff = 0.0, 0, 0.0
    t = time.perf_counter()
    for i, w in enumerate(windows):
        logits = net(input_ids=w[None].to(dev)).logits.float().cpu()
        if i < len(ref):
            diff = max(diff, float((logits - ref[i]).abs().max()))
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
        count += w.numel() - 1
    eval_s = time.perf_counter() - t
    row = {"gpu_budget" if cuda else "cpu_budget": memory.format_bytes(budget),
           "layers_per_device": {d: len(v) for d, v in where.items()},
           "device_map": {d: v if len(v) <= 6 else [v[0], "...", v[-1]] for d, v in where.items()},
           "ppl_random_tokens": round(math.exp(nll / count), 3), "max_abs_logit_diff_vs_whole_on_device": diff,
           "load_s": round(load_s, 1), "eval_s": round(eval_s, 1), "tokens": count}
    if cuda:
        row["peak_gpu_eval_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
    return row


def sizes(ap, text: str, flag: str) -> list[int]:
    """``--cap`` / ``--eval-budget``: comma-separated sizes (``memory.parse_size``, whose refusal names
    --max-memory, the CLI's flag, so the message is said again with this one)."""
    out = []
    for item in text.split(","):
        try:
            out.append(memory.parse_size(item))
        except UserError as exc:
            ap.error(f"{flag}: {str(exc).split(' ', 2)[-1]}")
    return out


@_cli.one_line_errors
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=_cli.count(1), default=64)
    ap.add_argument("--seq-len", type=_cli.count(2), default=512)
    ap.add_argument("--only", nargs="+", default=None,
                    help=f"shape names (default: llama-1.7b, with --tiny tiny; also: {', '.join(SHAPES)})")
    ap.add_argument("--cap", help="GPU caps for the quantize runs, comma-separated, e.g. 2GiB,1.5GiB "
                    "(default: per shape)")
    ap.add_argument("--eval-budget", help="GPU weights budget for the placed eval (default: per shape)")
    ap.add_argument("--no-reference", action="store_true", help="skip the uncapped reference run")
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, runs on CPU in seconds (tests the script)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = TINY if args.tiny else SHAPES
    # (a mistyped name measured nothing and wrote [] over --out, exit 0; so did tiny without --tiny, and the others
    # with it)
    _cli.unknown(ap, args.only, shapes, "shapes", "" if args.tiny else " (tiny: with --tiny)")
    only = args.only or [*shapes][:1]
    caps_given = sizes(ap, args.cap, "--cap") if args.cap else None
    budget_given = sizes(ap, args.eval_budget, "--eval-budget") if args.eval_budget else [None]
    if len(budget_given) > 1:  # (the rest were ignored)
        ap.error(f"--eval-budget takes one size, got {args.eval_budget!r}")
    _cli.writable(ap, args.out)
    samples, seq_len = (4, 32) if args.tiny else (args.samples, args.seq_len)
    if device == "cuda":  # compile the CUDA fast path (first use) before anything is timed
        try:
            from llmcomp.kernels import uniform_cuda

            uniform_cuda.extension()
        except Exception as exc:  # noqa: BLE001 — the bench still runs on the Triton/reference paths
            print(f"CUDA extension unavailable: {exc}", flush=True)
    rows = []
    for name, (shape, cap_text, budget_text) in shapes.items():
        if name not in only:
            continue
        caps = caps_given or [memory.parse_size(c) for c in cap_text.split(",")]
        budget = budget_given[0] or memory.parse_size(budget_text)
        dtype = torch.float16 if device == "cuda" else torch.float32
        model = build(shape, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        size16 = n_params * 2
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, shape["vocab_size"], (samples, seq_len), generator=gen)
        windows = torch.randint(0, shape["vocab_size"], (4, seq_len), generator=gen)
        row = {"model": name, "params": n_params, "model_gb_fp16": round(size16 / GB, 3),
               "model_gb_as_run": round(size / GB, 3), "calib": f"{samples}x{seq_len} random tokens",
               "method": "gptq w4 g128 act-order",
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__}
        # capped runs first, so their CPU RSS is not inflated by memory an earlier run left to the allocator
        row["capped"] = []
        for i, cap in enumerate(caps):
            if model is None:
                model = build(shape, dtype)  # the same weights again (same seed)
            res = quantize_run(model, ids, device, cap)
            row["capped"].append({"cap": memory.format_bytes(cap), "cap_over_fp16_model": round(cap / size16, 3),
                                  "enforced": device == "cuda", **res})
            print(json.dumps(row["capped"][-1]), flush=True)
            if "error" not in res and "placed_eval" not in row:
                from llmcomp.core.artifact import write_artifact

                with tempfile.TemporaryDirectory(prefix="gptq-mem-") as tmp:
                    art = Path(tmp) / "artifact"
                    write_artifact(art, model, None, base_model={"name": name, "random_weights": True}, stages=[])
                    row["artifact_gb"] = round(sum(f.stat().st_size for f in art.glob("*.safetensors")) / GB, 3)
                    model = None
                    row["placed_eval"] = placed_eval(art, device, budget, windows, Path(tmp) / "offload")
                    print(json.dumps(row["placed_eval"]), flush=True)
            model = None
        if not args.no_reference:  # the same weights again (same seed), no cap
            ref = quantize_run(build(shape, dtype), ids, device, None)
            row["reference_uncapped"] = ref
            for c in row["capped"]:
                if "weights_sha256" in c and "weights_sha256" in ref:
                    c["identical_to_reference"] = c["weights_sha256"] == ref["weights_sha256"]
            print(json.dumps(ref), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
