#!/usr/bin/env bash
# One device call for what the twentieth session left (bench/results/kernels_h200_notes.md, "Next"): the cache's one
# position counter (LLMCOMP_SHARED_POSITION=1, decode_bench.share_position: no per-layer counter kernel) — the
# decode-bench CUDA tests with it, then the compiled 8B W4 decode at batch 1 (lm_head quantized) with it and without,
# from one build; then the whole kernel CUDA test file on the current code (cut at TEST_S). ~9 min on a fresh machine.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, DECODE_S (seconds, 0 skips).
set -u
. bench/session_common.sh
LLMCOMP_SHARED_POSITION=1 TAIL=6 run ${TEST_S:-200} tests_shared.log python3 -m pytest -q -rf \
  tests/test_decode_bench.py -m cuda
for s in 1 0; do
  LLMCOMP_SHARED_POSITION=$s BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-200} TAG=_shared${s}_b1 BUILD=0 \
    bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys"
done
TAIL=6 run ${TEST_S:-200} cuda_tests_kernels.log python3 -m pytest -q -rf tests/test_kernels_cuda.py
