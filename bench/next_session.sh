#!/usr/bin/env bash
# One device call (twentieth session, third): the compiled 8B MXFP4 decode at batch 1 (lm_head quantized) with the
# GLU call for E2M1 weights and without (bench/glu_e2m1_session.sh, its tests skipped: they passed in the call
# before), then the W4 decode of the final code (the producers staged by default). ~6 min on a fresh machine.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: DECODE_S (seconds, 0 skips).
set -u
TESTS_S=0 DECODE_S=${DECODE_S:-200} bash bench/glu_e2m1_session.sh
BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-200} TAG=_final_b1 BUILD=0 bash bench/lmhead_session.sh 2>&1 \
  | grep -v "^real\|^user\|^sys"
