"""Peer row for GPTQ: llm-compressor's ``oneshot`` + ``GPTQModifier`` on the bundled model, on llmcomp's own
calibration windows, evaluated with llmcomp's own eval (same text, windows and reference as bench/quality.py).

llm-compressor pins older transformers / compressed-tensors than llmcomp's environment, so it runs in a
separate venv that shares torch with the main one (the main environment is left as it is):

    python -m venv /tmp/lcenv --system-site-packages
    /tmp/lcenv/bin/pip install "transformers==5.17.0" "compressed-tensors==0.19.0" llmcompressor==0.14.0.1
    # (check with --dry-run first that torch is not in the "Would install" line)
    /tmp/lcenv/bin/python bench/peer_llmcompressor.py quantize --bits 4 --group 64 -o /tmp/lc/out-w4g64
    /tmp/lcenv/bin/python bench/peer_llmcompressor.py quantize --bits 3 --group 64 -o /tmp/lc/out-w3g64
    # then, in the main environment (llmcomp imports compressed-tensors checkpoints):
    python bench/peer_llmcompressor.py eval /tmp/lc/out-w4g64 [/tmp/lc/out-w3g64] \\
        --out bench/results/quality_cpu_llmcompressor.json [--with-rows llmcomp_rows.json]

``quantize`` feeds llm-compressor exactly the windows llmcomp's GPTQ calibrates on
(``llmcomp.core.data.calib_windows``: 128 × 512 tokens, seed 0, as ``api.quantize`` / bench/quality.py) as a
pre-tokenized dataset, with llmcomp's GPTQ settings: int asym, act-order with static groups (llm-compressor's
``actorder="static"`` = "weight": no permutation stored), block 128, dampening 0.01 of the mean Hessian
diagonal, min/max grid, decoder linears only (lm_head kept), the model in float32 with scales rounded to
float16 by llm-compressor itself (``scale_dtype``: llmcomp stores float16 scales and imports only scales that
float16 holds exactly). Group 64, not 128: SmolLM2's 576 input columns are 4.5 groups of 128; llmcomp
quantizes the last 64 as a short group, llm-compressor 0.14 cannot (its group-divisibility check refuses the
layers; with ``bypass_divisibility_checks`` its weight observer fails: "unflatten: Provided sizes [-1, 128]
don't multiply up to the size of dim 1 (576)"), and compressed-tensors has no ragged groups either.
It writes the compressed-tensors checkpoint and ``llmcomp_peer.json`` (versions, settings, wall time, a
checksum of the calibration ids) next to it. ``eval`` also checks llmcomp's import against transformers +
compressed-tensors reading the same checkpoint (max |Δlogit|).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

SIDECAR = "llmcomp_peer.json"
CALIB_SAMPLES, SEQ_LEN, SEED = 128, 512, 0


def quantize(args) -> int:
    """Runs in the llm-compressor venv."""
    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcomp.core.data import calib_windows, corpus
    from llmcomp.core.model import resolve

    src = resolve(None)  # (None: the bundled model)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = calib_windows(tok, SEQ_LEN, CALIB_SAMPLES, SEED)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False, strategy="group",
                               group_size=args.group, actorder=args.actorder, scale_dtype=torch.float16)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                          bypass_divisibility_checks=args.ragged)
    t = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=CALIB_SAMPLES,
            max_seq_length=SEQ_LEN, shuffle_calibration_samples=False)
    quant_s = time.perf_counter() - t
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, save_compressed=True)
    tok.save_pretrained(args.output)
    side = {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": args.threads, "quant_time_s": round(quant_s, 1),
            "settings": {"bits": args.bits, "group_size": args.group, "symmetric": False, "actorder": args.actorder,
                         "block_size": 128, "dampening_frac": 0.01, "ignore": ["lm_head"], "model_dtype": "float32",
                         "scale_dtype": "float16",
                         "bypass_divisibility_checks": args.ragged},
            "calibration": {"text": corpus().name, "samples": CALIB_SAMPLES, "seq_len": SEQ_LEN, "seed": SEED,
                            "ids_sum": int(ids.sum())}}
    (args.output / SIDECAR).write_text(json.dumps(side, indent=1))
    print(json.dumps(side), flush=True)
    return 0


def transformers_delta(ckpt: Path, tokens: int = 64) -> float:
    """max |Δlogit| between llmcomp's import and transformers + compressed-tensors (``dequantize=True``: its
    default path does not take asymmetric pack-quantized layers) reading the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from llmcomp import api
    from llmcomp.core.data import eval_windows

    ids = eval_windows(AutoTokenizer.from_pretrained(ckpt), tokens, 1)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        return float((api.load(str(ckpt))(ids).logits - hf(ids).logits).abs().max())


def evaluate(args) -> int:
    """Runs in llmcomp's main environment."""
    torch.set_num_threads(args.threads)
    from llmcomp import api

    ref = api.record_reference(None, n_windows=args.windows)  # (None: the bundled model)
    rows = [{"name": "original", **api.evaluate(None, n_windows=args.windows, reference=ref)}]
    for ckpt in args.checkpoints:
        side = json.loads((ckpt / SIDECAR).read_text())
        s = side["settings"]
        name = f"llmcompressor-gptq-w{s['bits']}g{s['group_size']}"
        row = {**api.evaluate(str(ckpt), n_windows=args.windows, reference=ref), "name": name, "checkpoint": str(ckpt),
               "quant_time_s": side["quant_time_s"], "max_abs_dlogit_vs_transformers": transformers_delta(ckpt),
               "peer": side}
        rows.append(row)
        print(f"{name} ppl {row['ppl']:.2f}  kld {row['kld_mean']:.4f}  top1 {row['top1_agree']:.3f}  "
              f"bpw {row['bits_per_weight']:.3f}  {side['quant_time_s']}s", flush=True)
    for f, other in args.with_rows.items():  # llmcomp's own rows at the same settings (bench/quality.py output)
        for r in other["rows"][1:]:
            rows.append({**r, "name": f"llmcomp-{r['name']}", "source": str(f), "source_meta": other["meta"]})
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "eval_threads": args.threads, "windows": args.windows, "seq_len": SEQ_LEN, "text": rows[0]["text"],
            "note": "quantized by llm-compressor in its own venv (versions per row under 'peer'); evaluated by llmcomp"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


def check_eval(ap, args) -> None:
    """``eval``'s inputs before the reference runs: each checkpoint with its sidecar, each --with-rows file a
    bench/quality.py results file, --out writable (each was a traceback after minutes of evaluation)."""
    for ckpt in args.checkpoints:
        if not (ckpt / SIDECAR).is_file():
            ap.error(f"{ckpt} holds no {SIDECAR}: give a checkpoint written by this script's quantize")
    args.with_rows = {f: _cli.results(ap, f, flag="--with-rows", write=False) for f in args.with_rows or ()}
    for f, other in args.with_rows.items():
        if not isinstance(other.get("meta"), dict):
            ap.error(f"--with-rows {f} has no 'meta' of bench/quality.py")
    _cli.writable(ap, args.out)


@_cli.one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize", help="llm-compressor GPTQ (run in its venv)")
    q.add_argument("--bits", type=_cli.count(1), default=4)
    q.add_argument("--group", type=_cli.count(1), default=64)
    q.add_argument("--actorder", default="static", choices=("static", "weight", "group", "none"),
                   help="static (= weight), group, or none")
    q.add_argument("-o", "--output", type=Path, required=True)
    q.add_argument("--threads", type=_cli.count(1), default=1)
    q.add_argument("--bypass-divisibility", dest="ragged", action="store_true",
                   help="pass bypass_divisibility_checks=True (group sizes that do not divide 576; fails in 0.14)")
    e = sub.add_parser("eval", help="llmcomp eval of the checkpoints (run in the main environment)")
    e.add_argument("checkpoints", type=Path, nargs="+")
    e.add_argument("--out", type=Path, default=Path("bench/results/quality_cpu_llmcompressor.json"))
    e.add_argument("--windows", type=_cli.count(1), default=16)
    e.add_argument("--threads", type=_cli.count(1), default=1)
    e.add_argument("--with-rows", type=Path, nargs="*", help="bench/quality.py JSON files whose rows to include")
    args = ap.parse_args(argv)
    if args.cmd == "eval":
        check_eval(e, args)
    if args.cmd == "quantize" and args.actorder == "none":
        args.actorder = None
    return quantize(args) if args.cmd == "quantize" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
