"""CPU check that transformers loads ``llmcomp export --to gptq`` (through optimum + gptqmodel).

gptqmodel is not a dependency of llmcomp; this runs in a separate venv (the main environment untouched):

    python -m venv --system-site-packages /tmp/gqenv
    /tmp/gqenv/bin/pip install --no-deps optimum==2.3.0 gptqmodel==7.6.0 logbar==0.4.15 tokenicer==0.0.14 \\
        device-smi==0.5.7 defuser==0.0.28 threadpoolctl==3.8.0
    # pypcre (imported by gptqmodel) ships only as source and needs pcre2.h; without libpcre2-dev installed:
    apt-get download libpcre2-dev && dpkg-deb -x libpcre2-dev_*.deb /tmp/pcre2dev
    PYPCRE_INCLUDE_DIR=/tmp/pcre2dev/usr/include PYPCRE_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0 \\
        /tmp/gqenv/bin/pip install --no-deps pypcre==0.6.4
    /tmp/gqenv/bin/python bench/gptq_transformers.py --out bench/results/gptq_transformers_cpu.json

Per export: ``AutoModelForCausalLM.from_pretrained(export, dtype=float32)`` with gptqmodel's default kernel
choice (``backend="auto"``, on CPU the ATen int4 kernel for 4 bits) and with its plain torch kernel
(``backend="gptq_torch"``); max |Δlogit| against ``llmcomp.load(artifact)`` (float32). For the torch kernel
also: every layer's dequantized weight against llmcomp's rounded to float16 (that kernel multiplies the
float16 scales in float16, so bit-equality there is the exactness check of the layout), and the logits
again with its scales upcast to float32 (the same arithmetic as llmcomp's dequantize). For scale, the
difference that bfloat16 arithmetic alone makes: ``llmcomp.load(artifact, dtype=bfloat16)`` against float32,
and (4 bits) llmcomp's model with the ATen kernel's arithmetic emulated (``aten_like_max_abs_dlogit``).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmcomp
from llmcomp import api
from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

BUNDLED = {"w4g128-sym": Uniform(4, 128, True), "w4g128-asym": Uniform(4, 128), "w4g64-sym": Uniform(4, 64, True),
           "w4g64-asym": Uniform(4, 64)}
TINY = {"w4g32-asym": Uniform(4, 32), "w3g32-asym": Uniform(3, 32), "w2g16-asym": Uniform(2, 16),
        "w8-per-channel-sym": Uniform(8, 0, True), "w4g64-ragged-asym": Uniform(4, 64)}
BACKENDS = ("auto", "gptq_torch")
# gptqmodel 7.6.0's declared dependencies that its GPTQ load path does not import (left out of the venv), and its
# pin numpy==2.2.6 (numpy 2.4.6 used). 7.7.0 requires torch>=2.14.1; 7.6.0 requires torch>=2.8.0.
LEFT_OUT = ["datasets", "dill", "maturin", "ninja", "protobuf", "pyarrow", "torchao", "numpy==2.2.6"]
PACKAGES = ("torch", "transformers", "optimum", "gptqmodel", "accelerate", "safetensors", "numpy", "pypcre",
            "defuser", "tokenicer", "logbar", "device-smi", "threadpoolctl")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def hf_load(path: Path, bits: int, backend: str):
    from transformers import AutoModelForCausalLM, GPTQConfig

    # only the loading attributes (backend) of this config are used; the rest comes from the checkpoint
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=GPTQConfig(bits=bits, backend=backend))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def weight_check(ref, hf) -> dict:
    """Layers whose gptqmodel dequantized weight equals llmcomp's rounded to float16, bit for bit."""
    equal, worst = 0, 0.0
    layers = [(n, m) for n, m in ref.named_modules() if isinstance(m, QuantLinear)]
    for name, mod in layers:
        theirs = hf.get_submodule(name).dequantize_weight().t()
        ours = mod.dequantize().to(theirs.dtype)
        equal += int(torch.equal(theirs, ours))
        worst = max(worst, (theirs.float() - mod.dequantize()).abs().max().item())
    return {"layers": len(layers), "equal_to_ours_in_" + str(theirs.dtype).split(".")[1]: equal,
            "max_abs_dweight_vs_ours_fp32": worst}


def upcast_scales(hf) -> int:
    n = 0
    for m in hf.modules():
        if hasattr(m, "dequantize_weight") and isinstance(getattr(m, "scales", None), torch.Tensor):
            m.scales = m.scales.float()
            n += 1
    return n


def aten_like_logits(art: Path, ids: torch.Tensor) -> torch.Tensor:
    """llmcomp's model with the arithmetic of gptqmodel's CPU ATen int4 kernel: bfloat16 scales, the
    activations rounded to bfloat16 before the matmul and its output rounded to bfloat16 (the rest float32)."""
    import torch.nn.functional as F

    import llmcomp.core.qlinear as qlinear

    def linear(x, fmt, tensors, in_features, bias, cache):
        t = dict(tensors, weight_scale=tensors["weight_scale"].to(torch.bfloat16).to(tensors["weight_scale"].dtype))
        w = fmt.dequantize(t, in_features)
        return F.linear(x.to(torch.bfloat16).float(), w, bias).to(torch.bfloat16).to(x.dtype)

    original = qlinear.dequant_linear
    qlinear.dequant_linear = linear
    try:
        return logits(llmcomp.load(art), ids)
    finally:
        qlinear.dequant_linear = original


def run_case(model: str, name: str, fmt: Uniform, model_dir: str, ids: torch.Tensor, tmp: Path) -> dict:
    row = {"model": model, "case": name, "format": fmt.describe()}
    t = time.time()
    art = api.quantize(RTNConfig(format=fmt), tmp / name, model_dir)
    summary = api.export(art, "gptq", tmp / f"{name}-gptq")
    row.update(checkpoint_format=summary["checkpoint_format"], ragged_layers=summary["ragged_layers"],
               quantize_export_s=round(time.time() - t, 1))
    ref = llmcomp.load(art)
    ref_logits = logits(ref, ids)
    row["max_abs_logit"] = ref_logits.abs().max().item()
    # scale of bfloat16 arithmetic alone (the ATen int4 kernel computes in bfloat16): llmcomp itself in bf16
    row["llmcomp_bf16_max_abs_dlogit"] = (logits(llmcomp.load(art, dtype=torch.bfloat16), ids) - ref_logits
                                          ).abs().max().item()
    if fmt.bits == 4:
        row["aten_like_max_abs_dlogit"] = (aten_like_logits(art, ids) - ref_logits).abs().max().item()
    for backend in BACKENDS:
        res = {}
        try:
            t = time.time()
            hf = hf_load(tmp / f"{name}-gptq", fmt.bits, backend)
            res["kernel"] = type(hf.get_submodule(next(n for n, m in ref.named_modules()
                                                       if isinstance(m, QuantLinear)))).__name__
            res["max_abs_dlogit"] = (logits(hf, ids) - ref_logits).abs().max().item()
            res["load_forward_s"] = round(time.time() - t, 1)
            if backend == "gptq_torch":
                res["weights"] = weight_check(ref, hf)
                res["upcast_layers"] = upcast_scales(hf)
                res["max_abs_dlogit_scales_fp32"] = (logits(hf, ids) - ref_logits).abs().max().item()
        except Exception as exc:  # a kernel that refuses the checkpoint is a result too
            res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row[backend] = res
    print(json.dumps(row), flush=True)
    shutil.rmtree(tmp / name, ignore_errors=True)
    shutil.rmtree(tmp / f"{name}-gptq", ignore_errors=True)
    return row


@_cli.one_line_errors
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/gptq_transformers_cpu.json"))
    ap.add_argument("--tokens", type=_cli.count(1), default=32)
    ap.add_argument("--threads", type=_cli.count(1), default=2)
    ap.add_argument("--only", choices=("bundled", "tiny"), default=None)
    args = ap.parse_args()
    _cli.writable(ap, args.out)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from llmcomp.core.data import corpus, eval_windows
    from llmcomp.core.model import bundled_model_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only != "bundled":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.conftest import tiny_llama

            ids_tiny = torch.randint(0, 128, (1, args.tokens), generator=torch.Generator().manual_seed(0))
            for name, fmt in TINY.items():
                inter = 96 if "ragged" in name else 128  # in=96, g=64: groups of 64 and 32 in down_proj
                tiny_llama(hidden=64, inter=inter).save_pretrained(tmp / f"tiny-{inter}")
                rows.append(run_case(f"tiny Llama (hidden 64, inter {inter})", name, fmt, str(tmp / f"tiny-{inter}"),
                                    ids_tiny, tmp))
        if args.only != "tiny":
            bd = bundled_model_dir()
            ids = eval_windows(AutoTokenizer.from_pretrained(bd), args.tokens, 1)
            for name, fmt in BUNDLED.items():
                rows.append(run_case("bundled SmolLM2-135M", name, fmt, str(bd), ids, tmp))
    text = corpus().name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"versions": versions(), "left_out_of_venv": LEFT_OUT,
                                    "threads": args.threads, "tokens": args.tokens,
                                    "text": f"first {args.tokens} tokens of the held-out split ({text}); "
                                            f"tiny models: seeded random ids",
                                    "reference": "llmcomp.load(artifact), float32",
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
