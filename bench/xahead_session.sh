#!/usr/bin/env bash
# One GPU call: build; CUDA tests of the M <= 8 kernels (x a kblock ahead of its math, LLMCOMP_MMA_XAHEAD); the W4 GEMMs
# and an 8B layer's linears at M = 1 and 8 (bench/kernel_ab.py, the default kernel alone).
#   bash bench/xahead_session.sh   (on the GPU machine; knobs: TEST_S, AB_S; 0 skips)
set -u
source "$(dirname "$0")/session_common.sh"
TAIL=30 run "${AB_S:-120}" kernel_ab_xahead.log python3 bench/kernel_ab.py --knob stream --variants 0 --ms 1,8 \
  --out "$OUT/kernels_h200_xahead.json"
run "${TEST_S:-150}" cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
  -k "post_scale or every_m or streamed or group_not"
