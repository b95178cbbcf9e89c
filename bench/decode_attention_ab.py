"""The split-KV decode attention kernel alone (``llmcomp.kernels.decode_attention``), at the 8B decode shapes: 32 query
heads, 8 key/value heads, head dim 128, a static cache of ``--max-len`` positions of which ``--valid`` attend, batch 1
and 16; µs a call (a CUDA graph of copies over enough caches that each call reads from HBM) and % of the K/V bytes it
reads at the copy bandwidth measured in the same run, for each pipeline depth (``NUM_STAGES``), with
``--separate-merge`` the merge in the partial kernel and as its own kernel (``FUSED_MERGE`` on / off) too, with
``--chunks`` fixed positions a program (``CHUNK``; 0: ``chunk_size``'s rule) at the deepest pipeline, and, where
``bench/_old_decode_attention.py`` exists (a previous version of the module, put there by hand), that version.

    python bench/decode_attention_ab.py --out bench/results/decode_attention_h200.json
    python bench/decode_attention_ab.py --batch 1 --stages 3 --chunks 0,64,128,256,512 --out …_chunks.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import decode_attention as da

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=_cli.ints(1, "1,16"), default="1,16")
    ap.add_argument("--max-len", type=_cli.count(1), default=576)
    ap.add_argument("--valid", type=_cli.ints(1, "520,576"), default="520,576")
    ap.add_argument("--stages", type=_cli.ints(1, "1,2,3"), default="1,2,3")
    ap.add_argument("--separate-merge", action="store_true", help="also time the merge as a second kernel")
    ap.add_argument("--chunks", type=_cli.ints(0, "0,64", allow_empty=True), default="",
                    help="positions a program to time, comma-separated (0: the rule)")
    args = ap.parse_args()
    if max(args.valid) > args.max_len:
        ap.error(f"--valid {','.join(map(str, args.valid))}: more positions than --max-len {args.max_len}")
    _cli.writable(ap, args.out)
    _cli.needs_cuda(ap)
    old_path = Path(__file__).with_name("_old_decode_attention.py")
    # the merge as the environment sets it (LLMCOMP_ATTN_FUSED_MERGE; unset: by fused_merge's rule)
    variants = {f"stages{s}": (s, da.FUSED_MERGE, da.CHUNK) for s in args.stages}
    deepest = args.stages[-1]
    if args.separate_merge:  # the deepest pipeline with the merge in the partial kernel, and as its own kernel
        variants[f"stages{deepest}_fused_merge"] = (deepest, True, da.CHUNK)
        variants[f"stages{deepest}_separate_merge"] = (deepest, False, da.CHUNK)
    for c in args.chunks:  # (with --separate-merge: each merge form too)
        for merge in ((True, False) if args.separate_merge else (da.FUSED_MERGE,)):
            tag = "" if not args.separate_merge else "_fused_merge" if merge else "_separate_merge"
            variants[f"stages{deepest}_chunk{c or 'rule'}{tag}"] = (deepest, merge, c or None)
    old = None
    if old_path.exists():
        spec = importlib.util.spec_from_file_location("_old_decode_attention", old_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)  # (re-registers the op's name: each version's own function is called below)
    bw = kb.copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw, "rows": []}
    h, kvh, d, length = 32, 8, 128, args.max_len
    for b in args.batch:
        for valid in args.valid:
            nbytes = 2 * b * kvh * valid * d * 2  # the K and V positions that attend, bf16
            copies = kb._copies(2 * b * kvh * length * d * 2)  # caches of this size to fill the rotation
            caches = [(torch.randn(b, kvh, length, d, device="cuda", dtype=torch.bfloat16),
                       torch.randn(b, kvh, length, d, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
            q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device="cuda")
            mask[..., :valid] = True
            want = da.reference(q, *caches[0], mask, d ** -0.5)
            row = {"batch": b, "max_len": length, "valid": valid, "kv_bytes": nbytes, "copies": copies}
            runs = {name: (da, s) for name, s in variants.items()}
            if old is not None:
                runs["old"] = (old, None)
            for name, (mod, setting) in runs.items():
                if setting is not None:
                    da.NUM_STAGES, da.FUSED_MERGE, da.CHUNK = setting
                fn = mod.decode_attention._init_fn  # the function itself, not the dispatcher's registration
                got = fn(q, *caches[0], mask, d ** -0.5)
                row[f"{name}_max_err"] = float((got.float() - want.float()).abs().max())
                t = kb.per_call_seconds([lambda kv=kv: fn(q, *kv, mask, d ** -0.5) for kv in caches])
                row[f"{name}_us"] = round(t * 1e6, 2)
                row[f"{name}_roofline_pct"] = round(100 * nbytes / bw / t, 1)
            result["rows"].append(row)
            print(row, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
