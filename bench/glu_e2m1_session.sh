#!/usr/bin/env bash
# One device call for the branch glu-e2m1: the GLU call (gate/up and SiLU-mul as one kernel call) for E2M1 weights
# (mxfp4, nvfp4; uniform_cuda.prepare_glu). The GLU CUDA tests (uniform, MXFP4, NVFP4) and the compiled 2-layer
# decodes' traces, then the compiled 8B MXFP4 decode (lm_head quantized, batch 1) with the GLU call (LLMCOMP_GLU=1)
# and without (=0), each with --breakdown. ~7 min on a fresh machine (build ~90 s, a decode ~100 s).
#   bash bench/glu_e2m1_session.sh   (on the GPU machine; $OUT)   Knobs: TESTS_S, DECODE_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=8 run ${TESTS_S:-180} tests_glu_e2m1.log python3 -m pytest -q -rf tests/test_kernels_cuda.py \
  tests/test_decode_bench.py -k "glu or trace_quantized"
for g in 1 0; do
  LLMCOMP_GLU=$g BATCH=1 FORMATS=mxfp4 DECODE_S=${DECODE_S:-200} TAG=_glu$g BUILD=0 \
    bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys"
done
