#!/usr/bin/env bash
# One device call: the CUDA tests of the mma kernels' every path (every launch, every M, post-scale, module, E2M1) on the
# code as it is, time-limited.   bash bench/final_tests_session.sh   (on the GPU machine; $OUT)
set -u
. bench/session_common.sh
TAIL=4 run 150 cuda_tests_h200_session8.log python3 -m pytest -q tests/test_kernels_cuda.py \
  -k "every_launch or every_m or post_scale or module_matches or e2m1"
