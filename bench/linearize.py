"""Linearized students of the bundled model vs the teacher, measured in one run (meant for the GPU).

    python bench/linearize.py --out bench/results/linearize_gpu.json [--methods hedgehog,liger] [--keep 0,0.25]
        [--tokens 500k] [--transfer-steps 50] [--windows 16] [--contexts 2048,8192] [--passkey-samples 5]

Each student row: ``api.linearize`` (attention transfer on ``--calib-samples`` windows, then a LoRA
fine-tune with KL to the teacher on ``--tokens`` of the bundled calibration text) → artifact →
``llmcomp.load`` → held-out Austen perplexity (``--windows`` × 512 tokens), per-layer attention-output
transfer error (relative MSE after stage 1), tokens and wall time; then decode at each ``--contexts``
length (prefill the held-out text, greedy-decode ``--decode-tokens`` tokens one at a time): tokens/s,
the bytes the cache holds (KV tensors of softmax layers + recurrent states and window buffers of linear
layers), and passkey retrieval accuracy (greedy ``generate``). The teacher row is measured the same way.
Rows are merged into ``--out`` as each finishes (``--only`` re-measures some rows and keeps the others),
and a table is printed at the end. A small budget for a smoke run: ``--tokens 8k --transfer-steps 2
--windows 2 --contexts 256 --passkey-samples 0 --calib-samples 2 --seq-len 128``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmcomp import api
from llmcomp.cli.linearize import parse_tokens
from llmcomp.core import memory
from llmcomp.core.data import eval_windows
from llmcomp.core.hfcompat import cache_kwarg, output_cache
from llmcomp.eval.longctx import kv_nbytes
from llmcomp.linearize.distill import LinearizeConfig
from llmcomp.linearize.student import students_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


def cache_bytes(cache) -> int:
    """Bytes the cache holds: keys/values of softmax layers, states and window buffers of linear layers."""
    return kv_nbytes(cache)[0]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_stats(model, tok, contexts, n_new: int, device) -> dict:
    out = {}
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    for L in contexts:
        if limit and L + n_new > limit:
            out[str(L)] = {"skipped": f"longer than the model's {limit} positions"}
            continue
        ids = eval_windows(tok, L, 1).to(device)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        res = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(res)
        sync(device)
        t1 = time.perf_counter()
        held_prefill = cache_bytes(cache)
        nxt = res.logits[:, -1:].argmax(-1)
        kw = cache_kwarg(model)
        for _ in range(n_new):
            res = model(input_ids=nxt, **{kw: cache}, use_cache=True)
            cache = output_cache(res)
            nxt = res.logits[:, -1:].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
        row = {"prefill_s": round(t1 - t0, 3), "decode_tok_s": round(n_new / (t2 - t1), 1),
               "cache_bytes_after_prefill": held_prefill, "cache_bytes_after_decode": cache_bytes(cache)}
        if torch.device(device).type == "cuda":
            row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out[str(L)] = row
    return out


def measure(path, args, device) -> dict:
    from llmcomp.eval.longctx import passkey_accuracy

    ev = api.evaluate(path, n_windows=args.windows, seq_len=512, device=device)
    model, tok = api.load(path, return_tokenizer=True, device=device)
    row = {"ppl": round(ev["ppl"], 3), "linear_layers": len(students_of(model)),
           "decode": decode_stats(model, tok, args.contexts, args.decode_tokens, device)}
    if args.passkey_samples:
        row["passkey"] = passkey_accuracy(model, tok, args.passkey_lengths, args.passkey_samples)
    del model
    return row


def student(method: str, keep: float, args, device, workdir: Path) -> dict:
    config = LinearizeConfig(method=method, window=args.window, keep_softmax=keep, tokens=args.tokens,
                             transfer_steps=args.transfer_steps, seq_len=args.seq_len, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed)
    t0 = time.perf_counter()
    path = api.linearize(config, workdir / f"{method}-w{args.window}-{keep}", None, overwrite=True, calib_samples=args.calib_samples,
                         calib_seq_len=args.seq_len, device=device)
    wall = time.perf_counter() - t0
    stage = api.inspect(path)["stages"][-1]
    errors = stage["metrics"]["transfer_rel_mse"]
    ft = stage["metrics"]["finetune"]
    row = {"method": method, "keep_softmax": keep, "softmax_layers": stage["metrics"]["softmax_layers"],
           "window": args.window, "linearize_wall_s": round(wall, 1), "tokens": ft.get("tokens", 0),
           "kl_first": ft.get("kl_first"), "kl_last": ft.get("kl_last"),
           "transfer_rel_mse_mean": round(sum(errors.values()) / len(errors), 5), "transfer_rel_mse": errors}
    row.update(measure(path, args, device))
    return row


def table(rows: dict) -> str:
    teacher = rows.get("teacher", {}).get("ppl")
    lines = ["| row | softmax layers | ppl | × teacher | tokens | wall s | transfer MSE | cache MB (ctx) | decode tok/s | passkey |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        dec = {k: v for k, v in r.get("decode", {}).items() if "skipped" not in v}
        mb = " / ".join(f"{v['cache_bytes_after_decode'] / 2**20:.1f} ({k})" for k, v in dec.items())
        tps = " / ".join(f"{v['decode_tok_s']:.0f}" for v in dec.values())
        pk = " / ".join(f"{a:.0%}" for a in r.get("passkey", {}).values()) or "-"
        ratio = f"{r['ppl'] / teacher:.3f}" if teacher else "-"
        soft = "all" if name == "teacher" else str(len(r.get("softmax_layers", [])))
        lines.append(f"| {name} | {soft} | {r['ppl']:.2f} | {ratio} | {r.get('tokens', '-')} | "
                     f"{r.get('linearize_wall_s', '-')} | {r.get('transfer_rel_mse_mean', '-')} | {mb} | {tps} | {pk} |")
    return "\n".join(lines)


def check_settings(p, args) -> None:
    """Every row's settings before the teacher is measured (a bad --methods or --keep was a traceback after it;
    --contexts 0 or --passkey-samples -1 a ZeroDivisionError): the library's own checks, each as one line."""
    args.tokens = _cli.check(p, parse_tokens, args.tokens)
    _cli.check(p, memory.check_device, args.device)
    for keep in args.keep.split(","):
        try:
            fraction = float(keep)
        except ValueError:
            p.error(f"--keep {args.keep!r}: {keep!r} is not a fraction; give comma-separated fractions, e.g. 0,0.25")
        for method in args.methods.split(","):
            _cli.check(p, LinearizeConfig, method=method, window=args.window, keep_softmax=fraction,
                       tokens=args.tokens, transfer_steps=args.transfer_steps, seq_len=args.seq_len,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    if args.passkey_samples:  # (the bundled model's context; None, not its alias)
        from llmcomp.core.model import resolve

        _cli.check(p, api.check_long_lengths, api.context_limit(resolve(None)), 0, args.passkey_lengths,
                   args.passkey_samples)


@_cli.one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/linearize_gpu.json"))
    p.add_argument("--methods", default="hedgehog,liger")
    p.add_argument("--keep", default="0,0.25", help="--keep-softmax fractions, comma-separated")
    p.add_argument("--only", nargs="+", help="re-measure only these rows (e.g. teacher liger-w64-0.25)")
    p.add_argument("--tokens", default="500k")
    p.add_argument("--transfer-steps", type=_cli.count(0), default=50)
    p.add_argument("--calib-samples", type=_cli.count(1), default=16)
    p.add_argument("--seq-len", type=_cli.count(2), default=512)
    p.add_argument("--batch-size", type=_cli.count(1), default=8)
    p.add_argument("--lr", type=_cli.number(0, above=True), default=1e-3)
    p.add_argument("--window", type=_cli.count(0), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=_cli.count(1), default=16, help="held-out ppl windows of 512 tokens")
    p.add_argument("--contexts", type=_cli.ints(1, "2048,8000"), default=(2048, 8000),
                   help="decode context lengths (the model has 8192 positions)")
    p.add_argument("--decode-tokens", type=_cli.count(1), default=64)
    p.add_argument("--passkey-lengths", type=_cli.ints(1, "1024,2048"), default=(1024, 2048))
    p.add_argument("--passkey-samples", type=_cli.count(0), default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    wanted = ["teacher"] + [f"{m}-w{args.window}-{k}" for m in args.methods.split(",") for k in args.keep.split(",")]
    _cli.unknown(p, args.only, wanted)  # (a mistyped name measured nothing, exit 0)
    rows = (_cli.results(p, args.out, rows=dict) or {"rows": {}})["rows"]
    check_settings(p, args)  # (last: the passkey check reads the bundled model, converting it on a fresh machine)
    if args.device == "cpu":
        torch.set_num_threads(1)  # a shared CPU machine
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            if name == "teacher":
                rows[name] = measure(None, args, args.device)
            else:
                method, _, keep = name.rsplit("-", 2)
                rows[name] = student(method, float(keep), args, args.device, Path(tmp))
            rows[name]["row_wall_s"] = round(time.perf_counter() - t0, 1)
            meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                    "torch": torch.__version__, "settings": {k: v for k, v in vars(args).items() if k != "out"},
                    "wall_s": round(time.perf_counter() - start, 1)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
            print(f"{name}: ppl {rows[name]['ppl']:.2f} ({rows[name]['row_wall_s']} s)", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
