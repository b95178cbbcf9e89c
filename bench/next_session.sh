#!/usr/bin/env bash
# One device call for what the nineteenth session left (bench/results/kernels_h200_notes.md, "Next"): the RMSNorm
# split (now the default at <= 8 tokens a step) with its epilogue's inputs staged in shared memory by cp.async right
# after grid_dep_wait (norm_stage), against the same split reading them after the reduction (LLMCOMP_NORM_STAGE=0) and
# the unsplit step, all from one build; first its CUDA tests (the staged and the global reads give the same bits).
#   bash bench/next_session.sh   (on the GPU machine; $OUT)
set -u
BATCHES=${BATCHES:-1} bash bench/norm_session.sh
