#!/usr/bin/env bash
# One device call: the opt-in fused rotary embedding + cache write + attention (LLMCOMP_ROPE_ATTENTION=1,
# decode_attention.rope_forward / kernels.decode_attention.decode_attention_rope). Its CUDA tests (the kernel against
# reference_rope, both dtypes, every merge; the decode-bench CUDA tests with it on), then the compiled 8B W4 decode
# (lm_head quantized) at batch 1 with it on and off from one build (tags _s21_rope1_b1, _s21_rope0_b1). ~7 min.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, DECODE_S (seconds, 0 skips), ROPES.
set -u
. bench/session_common.sh
LLMCOMP_ROPE_ATTENTION=1 TAIL=6 run ${TEST_S:-200} tests_rope.log python3 -m pytest -q -rf -m cuda \
  tests/test_decode_attention.py tests/test_decode_bench.py -k "rope or decode or graph or norm"
for r in ${ROPES:-1 0}; do
  LLMCOMP_ROPE_ATTENTION=$r BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-140} TAG=_s21_rope${r}_b1 BUILD=0 \
    bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys" | tail -4
done
