#!/usr/bin/env bash
# One device call (prepared in the forty-first session, run in the forty-second): the whole CUDA test file on the
# byte-scaled E2M1 code (kernel kind 9), then the E2M1 launch sweeps on kind 9 — the rules were swept on kind 1,
# whose MT = 2 kernels hold 4 fewer registers — at M = 1 and 16, MXFP4 and NVFP4, bf16; the rule's pick is in each
# sweep.
# Between the two (M256_S): W4, MXFP4 and NVFP4 at M = 256 (prefill: dequantize, then cuBLAS; E2M1 now multiplies
# in fp32).
#   bash bench/e2m1_kind9_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, SWEEP_S, M256_S (0 skips)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-300} kernels_cuda_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py
step ${M256_S:-90} python3 bench/bench_kernels.py --bits 4 --float-formats mxfp4,nvfp4 --ms 256 \
  --out "$OUT/kernels_m256.json"
for f in mxfp4 nvfp4; do
  step ${SWEEP_S:-120} python3 bench/bench_kernels.py --sweep $f --ms 1,16 --out "$OUT/sweep_${f}_kind9.json"
done
grep -E "^sweep|best|pick|M=256" "$OUT/session.log" | cut -c1-150
