#!/usr/bin/env bash
# One device call: the opt-in fused rotary embedding + cache write + attention (LLMCOMP_ROPE_ATTENTION=1,
# decode_attention.rope_forward / kernels.decode_attention.decode_attention_rope). Its CUDA tests (the kernel against
# reference_rope, both dtypes, every merge, every form; the decode-bench CUDA tests with it on), then the compiled 8B
# W4 decode (lm_head quantized) at batch 1 from one build: off (tag _s22_rope0_b1) and the default form
# (LLMCOMP_ROPE_FORM=3: every vector loaded in the layout it is used in, the new key's score apart: _s22_rope3_b1).
# Forms 2 (the rotation in the loop) and 1 (before it, timed in the twenty-first session at 1.790 ms with a 5.47 µs
# partial kernel) with ROPES="2 1" in a second call. ~8 min on a fresh machine.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, DECODE_S (seconds, 0 skips), ROPES
#   (forms to time, 0 = off; default "0 3"; more do not fit one call's 600 s).
set -u
. bench/session_common.sh
LLMCOMP_ROPE_ATTENTION=1 TAIL=6 run ${TEST_S:-200} tests_rope.log python3 -m pytest -q -rf -m cuda \
  tests/test_decode_attention.py tests/test_decode_bench.py -k "rope or decode or graph or norm"
for r in ${ROPES:-0 3}; do
  LLMCOMP_ROPE_ATTENTION=$([ "$r" = 0 ] && echo 0 || echo 1) LLMCOMP_ROPE_FORM=$r BATCH=1 FORMATS=uniform \
    DECODE_S=${DECODE_S:-140} TAG=_s22_rope${r}_b1 BUILD=0 \
    bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys" | tail -4
done
