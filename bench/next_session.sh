#!/usr/bin/env bash
# One device call for what the sixteenth session left (bench/results/kernels_h200_notes.md, "Next"): the fixed cost
# of a small W4 call split from its bytes (bench/fixed_cost.py: o's and q/k/v's launch configuration over a sweep of
# K, cold and L2-warm, dependent launch off and on), then the compiled 8B W4 decode (lm_head quantized, batch 1, the
# current defaults) with --layers-per-graph 32, to decide whether the layer stack should be one graph by default.
# (The sixteenth session's own calls are recorded in bench/results/decode_h200_session16.log.)
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: FIXED_S, DECODE_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=30 run ${FIXED_S:-240} fixed_cost.log python3 bench/fixed_cost.py --out "$OUT/fixed_cost_h200.json"
SPANS=32 BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-200} TAG=_defaults BUILD=0 bash bench/lmhead_session.sh 2>&1 \
  | grep -v "^real\|^user\|^sys"
