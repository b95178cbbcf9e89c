#!/usr/bin/env bash
# One device call for what the fifteenth session left to run (bench/results/kernels_h200_notes.md, "Next"): the CUDA
# tests written after its device time, then the compiled 8B W4 decode (lm_head quantized, combo kernels) with and
# without the attention kernels' dependent launch (LLMCOMP_ATTN_PDL=1), each with --breakdown's attributed timeline.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TESTS_S, DECODE_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=4 run ${TESTS_S:-300} tests_next.log python3 -m pytest -q -rf tests/test_decode_bench.py \
  tests/test_codebook_cuda.py tests/test_decode_attention.py \
  -k "combo or layers_per_graph or graph_replay or extension_checks_raise or dependent_launch"
for pdl in 0 1; do
  tag=_combo; [ "$pdl" = 1 ] && tag=_combo_attnpdl
  LLMCOMP_ATTN_PDL=$pdl FORMATS=uniform DECODE_S=${DECODE_S:-200} TAG=$tag BUILD=0 \
    EXTRA="--inductor-option combo_kernels=true" bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys"
done
