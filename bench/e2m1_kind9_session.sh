#!/usr/bin/env bash
# One device call (prepared in the forty-first session, not run yet): the whole CUDA test file on the byte-scaled
# E2M1 code (kernel kind 9), then the E2M1 launch sweeps on kind 9 — the rules were swept on kind 1, whose MT = 2
# kernels hold 4 fewer registers — at M = 1 and 16, MXFP4 and NVFP4, bf16; the rule's pick is in each sweep.
#   bash bench/e2m1_kind9_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S (0 skips), SWEEP_S
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-300} kernels_cuda_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py
for f in mxfp4 nvfp4; do
  step ${SWEEP_S:-120} python3 bench/bench_kernels.py --sweep $f --ms 1,16 --out "$OUT/sweep_${f}_kind9.json"
done
grep -E "^sweep|best|pick" "$OUT/session.log" | cut -c1-150
