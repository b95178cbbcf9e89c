#!/usr/bin/env bash
# One GPU call after the VQ bank / dequant / kpad branches were measured: build, the full CUDA suite, the VQ rows
# with the replicated table and its 16-warp launch rule, and W4 at M = 256 (the dequant column).
set -u
. bench/session_common.sh
timeout ${BENCH_S:-150} python3 bench/bench_kernels.py --out "$OUT/kernels_vq_copies.json" --ms 1,16 --bits 4 \
  --float-formats vq2,vq3 2>&1 | grep -E "^(vq|W4)" | tee "$OUT/bench_vq.log" | tail -20
timeout ${TEST_S:-260} python3 -m pytest -q tests/test_codebook_cuda.py tests/test_kernels_cuda.py tests/test_codebook_kernel.py \
  2>&1 | tee "$OUT/kernels_cuda_tests_h200.log" | tail -4
timeout ${M256_S:-90} python3 bench/bench_kernels.py --out "$OUT/kernels_m256.json" --ms 256 --bits 4 --float-formats '' \
  2>&1 | grep -E "^W4" | tee "$OUT/bench_m256.log"
