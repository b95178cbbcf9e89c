#!/usr/bin/env bash
# One GPU call: build; CUDA tests of the streamed M <= 8 kernel (and the M <= 8 kernels around it); the A/B of the
# streamed kernel (off / 8 / 16 consumer warps) on the W4 GEMMs and an 8B layer's linears (bench/kernel_ab.py --knob
# stream), then at 2 bits (AB2_S).
#   bash bench/stream_session.sh   (on the GPU machine; knobs: TEST_S, TEST_K, AB_S, AB2_S, MS, NS; 0 skips)
set -u
source "$(dirname "$0")/session_common.sh"
run "${TEST_S:-150}" cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
  -k "${TEST_K:-streamed or post_scale}"
TAIL=40 run "${AB_S:-200}" kernel_ab_stream.log env LLMCOMP_MMA_STREAM_STAGES=${NS:-8} python3 bench/kernel_ab.py \
  --knob stream --ms ${MS:-1,8} --out "$OUT/kernels_h200_stream.json"
TAIL=20 run "${AB2_S:-0}" kernel_ab_stream_w2.log env LLMCOMP_MMA_STREAM_STAGES=${NS:-8} python3 bench/kernel_ab.py \
  --knob stream --bits 2 --ms 1 --chains-only --out "$OUT/kernels_h200_stream_w2.json"
