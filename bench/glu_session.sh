#!/usr/bin/env bash
# One device call for the branch glu-epilogue: the gated MLP's gate/up projections and SiLU-mul as one kernel call
# (rows interleaved 8 and 8 a tile, silu(gate) * up in the GEMM's epilogue). Its CUDA tests, then the compiled 8B W4
# decode (lm_head quantized, batch 1, the defaults) with it (LLMCOMP_GLU=1) and without (=0), each with --breakdown.
#   bash bench/glu_session.sh   (on the GPU machine; $OUT)   Knobs: TESTS_S, DECODE_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=6 run ${TESTS_S:-300} tests_glu.log python3 -m pytest -q -rf tests/test_kernels_cuda.py \
  tests/test_decode_bench.py tests/test_codebook_cuda.py \
  -k "glu or trace_quantized or combo or dependent_launch or extension_checks or post_scale"
for g in 1 0; do
  LLMCOMP_GLU=$g BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-150} TAG=_glu$g BUILD=0 \
    bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys"
done
