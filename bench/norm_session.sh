#!/usr/bin/env bash
# One device call for the RMSNorms split into the kernel calls' epilogues (llmcomp/core/norm_split.py; csrc EpiArgs):
# its CUDA tests (the producer and consumer epilogues against the reference at every M and launch configuration; the
# compiled decode with them, with and without dependent launch), then the compiled 8B W4 decode (lm_head quantized,
# the defaults) split (with and without its inputs staged in shared memory) and not split, each with --breakdown, at
# each batch of BATCHES.
#   bash bench/norm_session.sh   (on the GPU machine; $OUT)
# Knobs: TEST_S, DECODE_S (seconds, 0 skips), BATCHES, SPLITS.
set -u
. bench/session_common.sh
TAIL=15 run ${TEST_S:-240} tests.log python3 -m pytest -q tests/test_kernels_cuda.py tests/test_decode_bench.py \
  -k "norm_split or split_norm or glu_epilogue or trace_quantized"
# SPLITS: 1 (split, the epilogue's inputs staged by cp.async), 1s0 (split, LLMCOMP_NORM_STAGE=0), 0 (not split)
for b in ${BATCHES:-1 16}; do
  for v in ${SPLITS:-1 1s0 0}; do
    LLMCOMP_NORM_SPLIT=${v%s0} LLMCOMP_NORM_STAGE=$([ "$v" = 1s0 ] && echo 0 || echo 1) BATCH=$b FORMATS=uniform \
      DECODE_S=${DECODE_S:-150} TAG=_norm${v}_b$b BUILD=0 bash bench/lmhead_session.sh 2>&1 \
      | grep -v "^real\|^user\|^sys"
  done
done
