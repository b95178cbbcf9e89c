"""Decode tokens/s, compressed vs original (see llmcomp/eval/decode_bench.py; same flags as
``llmcomp bench decode``):

    python bench/decode.py --synthetic llama3-8b --batch 1,16 --out bench/results/decode_h200.json
    python bench/decode.py out/w4g128 [--original MODEL] --batch 1,16
"""
from __future__ import annotations

import sys

from llmcomp.cli.app import app

if __name__ == "__main__":
    app(["bench", "decode", *sys.argv[1:]], prog_name="llmcomp")
