"""Decode tokens/s on a GPU: dense KV cache vs Mustafar's bitmap-compressed cache (Triton kernel).

    python bench/kv_decode_gpu.py --out bench/results/kv_decode_gpu.json \
        [--shape llama3-8b|smollm2] [--batch 8] [--contexts 2048 4096 8192] [--steps 64] [--sparsity 0.5 0.7]

``llama3-8b``: a randomly initialized model of Llama-3-8B's shape in bf16 (no hub access; decode
speed does not depend on the weights' values). ``smollm2``: the bundled SmolLM2-135M. For every
context: prefill ``batch`` random prompts (in chunks), then time ``steps`` greedy decode steps with
CUDA synchronization; rows: dense (SDPA + DynamicCache), Mustafar with the Triton kernel, and (with
--reference) Mustafar with the torch decompress-then-SDPA path. Also records the KV bytes held after
prefill and the peak GPU memory. Each row is appended to the JSON file as soon as it is measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from llmcomp.core.hfcompat import cache_kwarg as cache_kw, output_cache
from llmcomp.core.paths import write_json
from llmcomp.eval.decode_bench import SYNTHETIC, synthetic_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


def build(shape: str):
    if shape == "smollm2":
        from llmcomp import api

        return api.load(None, dtype=torch.bfloat16, device="cuda")
    return synthetic_model(shape)


@torch.no_grad()
def measure(model, batch: int, context: int, steps: int, chunk: int = 1024) -> dict:
    from llmcomp.eval.longctx import kv_nbytes

    torch.manual_seed(0)
    ids = torch.randint(100, 30000, (batch, context), device="cuda")
    cache = None
    torch.cuda.reset_peak_memory_stats()
    for s in range(0, context, chunk):
        out = model(input_ids=ids[:, s:s + chunk], **{cache_kw(model): cache}, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
    held, dense = kv_nbytes(cache)
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(40):  # warm-up past one compressed-block flush (every 33 steps: Triton compiles the new T)
        out = model(input_ids=tok, **{cache_kw(model): cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, **{cache_kw(model): cache}, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"tokens_per_s": batch * steps / dt, "ms_per_step": 1000 * dt / steps, "kv_bytes": held,
            "kv_dense_bytes": dense, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30}


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/kv_decode_gpu.json"))
    ap.add_argument("--shape", default="llama3-8b", choices=[*SYNTHETIC, "smollm2"])
    ap.add_argument("--batch", type=_cli.count(1), default=8)
    ap.add_argument("--contexts", type=_cli.count(1), nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--steps", type=_cli.count(1), default=64)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--window", type=_cli.count(0), default=32)
    ap.add_argument("--reference", action="store_true", help="also time the torch decompress path")
    args = ap.parse_args(argv)
    from llmcomp.prune.kv import MustafarConfig, install, uninstall

    for s in args.sparsity:  # (the policy's own checks, before the model is built)
        _cli.check(ap, MustafarConfig, s, s, window=args.window, kernel="auto")
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)

    model = build(args.shape)
    configs = [("dense", None)]
    for s in args.sparsity:
        configs.append((f"mustafar-{s:g}-triton", MustafarConfig(s, s, window=args.window, kernel="auto")))
        if args.reference:
            configs.append((f"mustafar-{s:g}-torch", MustafarConfig(s, s, window=args.window, kernel="dense")))
    meta = {"shape": args.shape, "batch": args.batch, "steps": args.steps, "window": args.window,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    rows = []
    result = {"meta": meta, "rows": rows}
    for context in args.contexts:
        for name, policy in configs:
            uninstall(model)
            if policy is not None:
                install(model, policy)
            try:
                row = {"name": name, "context": context, **measure(model, args.batch, context, args.steps)}
            except torch.OutOfMemoryError:
                row = {"name": name, "context": context, "error": "out of GPU memory"}
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out, result, partial=True)  # (a run cut short keeps its rows)
    write_json(args.out, result)
    base = {r["context"]: r for r in rows if r["name"] == "dense" and "tokens_per_s" in r}
    print("\n| context | config | tokens/s | × dense | KV MB | KV % dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            ref = base.get(r["context"])
            speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
            print(f"| {r['context']} | {r['name']} | {r['tokens_per_s']:.0f} | {speed} | {r['kv_bytes'] / 2**20:.0f} | "
                  f"{100 * r['kv_bytes'] / r['kv_dense_bytes']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
