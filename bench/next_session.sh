#!/usr/bin/env bash
# One device call for what the nineteenth session left (bench/results/kernels_h200_notes.md, "Next"): the RMSNorm
# split is the default at <= 8 tokens a step; time a producer's residual and γ staged in shared memory by cp.async
# right after grid_dep_wait (norm_stage, LLMCOMP_NORM_STAGE=1: o and down were faster with it, but it was only timed
# together with the consumers' sums staged, which lost) against the default and the unsplit step, from one build,
# after the norm CUDA tests (those of the epilogue twice: staged and not).
#   bash bench/next_session.sh   (on the GPU machine; $OUT; ~8 min on a fresh machine)
set -u
BATCHES=${BATCHES:-1} bash bench/norm_session.sh
