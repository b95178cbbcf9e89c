#!/usr/bin/env bash
# One device call (twenty-first session): the decode bench's new defaults — the cache's one position counter, and
# `outer` (the rotary embedding, final norm, the step's tail — argmax, token copy, position add — and the causal
# mask's function compiled) — under the decode-bench CUDA tests, then the compiled 8B W4 decode (lm_head quantized)
# at batch 1 and 16 (tags _s21_b1, _s21_b16). ~9 min on a fresh machine.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, DECODE_S, B16_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=6 run ${TEST_S:-200} tests_decode_bench.log python3 -m pytest -q -rf tests/test_decode_bench.py -m cuda
BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-150} TAG=_s21_b1 BUILD=0 bash bench/lmhead_session.sh 2>&1 \
  | grep -v "^real\|^user\|^sys"
BATCH=16 FORMATS=uniform DECODE_S=${B16_S:-200} TAG=_s21_b16 BUILD=0 bash bench/lmhead_session.sh 2>&1 \
  | grep -v "^real\|^user\|^sys"
