#!/usr/bin/env bash
# One device call for what the twentieth session left (bench/results/kernels_h200_notes.md, "Next"), two opt-in
# switches of the decode bench: the cache's one position counter (LLMCOMP_SHARED_POSITION=1, share_position: no
# per-layer counter kernel) and the rotary embedding and final norm compiled too (LLMCOMP_COMPILE_OUTER=1). The
# decode-bench CUDA tests with both on, then the compiled 8B W4 decode at batch 1 (lm_head quantized) with neither
# (tag _sw00), the counter only (_sw10) and both (_sw11), from one build (~8 min on a fresh machine). With
# KERNEL_TESTS=1 (a second call: KERNEL_TESTS=1 DECODE_S=0 TEST_S=0 ...) the whole kernel CUDA test file on the
# current code instead, cut at KTEST_S (not run in full since the eighth session).
#   bash bench/next_session.sh   (on the GPU machine; $OUT)
# Knobs: TEST_S, DECODE_S, KTEST_S (seconds, 0 skips), SWITCHES, KERNEL_TESTS.
set -u
. bench/session_common.sh
LLMCOMP_SHARED_POSITION=1 LLMCOMP_COMPILE_OUTER=1 TAIL=6 run ${TEST_S:-200} tests_switches.log \
  python3 -m pytest -q -rf tests/test_decode_bench.py -m cuda
for sw in ${SWITCHES:-00 10 11}; do
  LLMCOMP_SHARED_POSITION=${sw:0:1} LLMCOMP_COMPILE_OUTER=${sw:1:1} BATCH=1 FORMATS=uniform \
    DECODE_S=${DECODE_S:-200} TAG=_sw${sw}_b1 BUILD=0 bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys"
done
if [ "${KERNEL_TESTS:-0}" = 1 ]; then
  TAIL=6 run ${KTEST_S:-400} cuda_tests_kernels.log python3 -m pytest -q -rf tests/test_kernels_cuda.py
fi
