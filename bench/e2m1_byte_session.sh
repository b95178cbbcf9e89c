#!/usr/bin/env bash
# One device call (forty-first session): E2M1 block scales as bytes (kernel elem 9, uniform_cuda.e2m1_byte_scales)
# against the 16-bit scales (LLMCOMP_E2M1_BYTE_SCALES=0), the same build: the CUDA tests of every E2M1 path first,
# then the kernel table's MXFP4 / NVFP4 rows (and W4 beside them) alternately on and off, RUNS rounds.
#   bash bench/e2m1_byte_session.sh   (on the GPU machine; $OUT)
# Knobs: TEST_S (0 skips the tests), BENCH_S (seconds a table), RUNS (default "a b"), MS (default 1,16)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-240} e2m1_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py \
  -k "e2m1 or every_launch or glu or dequant"
for r in ${RUNS-a b}; do
  for s in 1 0; do
    step ${BENCH_S:-90} env LLMCOMP_E2M1_BYTE_SCALES=$s python3 bench/bench_kernels.py --bits 4 \
      --float-formats mxfp4,nvfp4 --ms ${MS:-1,16} --out "$OUT/e2m1_bytes${s}_$r.json"
  done
done
grep -E "^(mxfp4|nvfp4|MXFP4|NVFP4)|^== " "$OUT/session.log" | cut -c1-150
