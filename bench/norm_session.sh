#!/usr/bin/env bash
# One device call for the RMSNorms split into the kernel calls' epilogues (llmcomp/core/norm_split.py; csrc EpiArgs):
# its CUDA tests (the producer and consumer epilogues against the reference at every M and launch configuration; the
# compiled decode with them, with and without dependent launch), then the compiled 8B W4 decode (lm_head quantized,
# the defaults) split (the default: a producer's inputs staged in shared memory; and unstaged) and not split, each with
# --breakdown, at each batch of BATCHES (each decode ~100 s: DECODE_S 200).
#   bash bench/norm_session.sh   (on the GPU machine; $OUT)
# Knobs: TEST_S, DECODE_S (seconds, 0 skips), BATCHES, SPLITS.
set -u
. bench/session_common.sh
TAIL=15 run ${TEST_S:-240} tests.log python3 -m pytest -q tests/test_kernels_cuda.py tests/test_decode_bench.py \
  -k "norm_split or split_norm or glu_epilogue or trace_quantized"
LLMCOMP_NORM_STAGE=0 TAIL=3 run ${TEST_S:-240} tests_stage0.log \
  python3 -m pytest -q tests/test_kernels_cuda.py -k norm_split
# SPLITS: 1 (split with a producer's residual and γ staged, the default), 1s0 (split, unstaged: LLMCOMP_NORM_STAGE=0),
# 0 (not split)
for b in ${BATCHES:-1 16}; do
  for v in ${SPLITS:-1 1s0 0}; do
    stage=1; [ "$v" = 1s0 ] && stage=0
    LLMCOMP_NORM_SPLIT=${v%s0} LLMCOMP_NORM_STAGE=$stage BATCH=$b FORMATS=uniform \
      DECODE_S=${DECODE_S:-200} TAG=_norm${v}_b$b BUILD=0 bash bench/lmhead_session.sh 2>&1 \
      | grep -v "^real\|^user\|^sys"
  done
done
