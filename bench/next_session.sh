#!/usr/bin/env bash
# One device call for the sixteenth session's defaults (bench/results/kernels_h200_notes.md): the CUDA tests of what
# changed (the post-scale kernel's group check raising, dependent launch with the attention's kernels as dependents,
# combo kernels), then the compiled 8B W4 decode (lm_head quantized) with the defaults as they are now — combo kernels
# and, under --pdl, the decode attention launched as a dependent — at batch 1 and 16, each with --breakdown.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TESTS_S, DECODE_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=4 run ${TESTS_S:-300} tests_next.log python3 -m pytest -q -rf tests/test_decode_bench.py \
  tests/test_codebook_cuda.py tests/test_decode_attention.py \
  -k "combo or layers_per_graph or graph_replay or extension_checks_raise or dependent_launch"
for b in 1 16; do
  BATCH=$b FORMATS=uniform DECODE_S=${DECODE_S:-200} TAG=_defaults_b$b BUILD=0 bash bench/lmhead_session.sh 2>&1 \
    | grep -v "^real\|^user\|^sys"
done
