#!/usr/bin/env bash
# One device call (forty-fourth session): W4 at M = 9..16 with x staged in shared memory in the post-scale kernel
# (LLMCOMP_MMA_XSTAGE16, uniform_cuda.xstage16; at most four warps a row group) — the CUDA file (TEST_K narrows it),
# the W4 sweep at M = 12 and 16 over two-tile launches with the switch off and on on the six decode shapes, then the
# decoder-layer chains at M = 16 (bench/kernel_ab.py --knob xstage16).
#   bash bench/xstage16_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, TEST_K, SWEEP_S, AB_S (0 skips each)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-240} kernels_cuda_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py \
  ${TEST_K:+-k "$TEST_K"}
CONFIGS=2.1.2,2.1.4,2.2.1,2.2.2,2.2.4,2.4.1,2.4.2,2.8.1
SHAPES=4096x4096,6144x4096,14336x4096,4096x14336,28672x4096,28672x8192
for on in 0 1; do
  LLMCOMP_MMA_XSTAGE16=$on step ${SWEEP_S:-150} python3 bench/bench_kernels.py --sweep w4 --ms 12,16 \
    --configs $CONFIGS --shapes $SHAPES --out "$OUT/sweep_w4_xstage16_$on.json"
done
step ${AB_S:-120} python3 bench/kernel_ab.py --knob xstage16 --ms 16 --out "$OUT/kernels_ab_xstage16.json"
grep -E "^sweep|speedup|roofline_pct" "$OUT/session.log" | cut -c1-170
