"""GPTQ memory and time on the GPU: the layer-by-layer driver keeps one decoder layer on the device.

    python bench/gptq_memory.py --out bench/results/gptq_memory_h100.json

Builds Llama-architecture models from configs with random weights (no download): a >= 1.5 B-parameter
one and one shaped like the bundled SmolLM2-135M. The model stays in CPU memory; only the layer being
calibrated is moved to the GPU. Reports model size, peak GPU memory (torch.cuda.max_memory_allocated),
peak CPU RSS and wall time for GPTQ W4 g128 with random calibration tokens.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from llmcomp.formats import Uniform
from llmcomp.quant import quantize_model
from llmcomp.quant.gptq import GPTQConfig

SHAPES = {
    "llama-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


def build(shape: dict, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args(argv)
    rows = []
    for name, shape in SHAPES.items():
        if args.only and name not in args.only:
            continue
        model = build(shape, torch.float16)
        n_params = sum(p.numel() for p in model.parameters())
        size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        ids = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        quantize_model(model, GPTQConfig(format=Uniform(bits=4, group_size=128)), ids, device="cuda")
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        row = {"model": name, "params": n_params, "model_gb_fp16": round(size_gb, 3),
               "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
               "peak_cpu_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
               "gptq_w4g128_wall_s": round(wall, 1), "calib": f"{args.samples}x{args.seq_len} random tokens",
               "device": torch.cuda.get_device_name()}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
