#!/usr/bin/env bash
# One device call for what the eighteenth session left (bench/results/kernels_h200_notes.md, "Next"): the RMSNorm split
# with its epilogue in instantiations of its own (the post-scale kernel at M <= 8; every other kernel compiles as in
# the seventeenth session, instruction for instruction): its CUDA tests (the epilogues against the reference; the
# 2-layer decode fed the eager tokens, logits bounded by the unsplit path's), then the 8B W4 decode at batch 1 with
# LLMCOMP_NORM_SPLIT=1 and =0 from the same build (the unsplit step should be the seventeenth session's 1.95 ms).
# If the split wins and its test passes, make it the default (norm_split_enabled) for up to split_rows() tokens.
# (The eighteenth session's own calls are recorded in bench/results/decode_h200_session18.log.)
#   bash bench/next_session.sh   (on the GPU machine; $OUT)
set -u
BATCHES=${BATCHES:-1} bash bench/norm_session.sh
