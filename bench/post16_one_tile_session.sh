#!/usr/bin/env bash
# One device call (prepared in the forty-second session, not run): 4-bit codes at M = 9..16 through the post-scale
# kernel at one row tile a warp (LLMCOMP_MMA_POST16_ONE_TILE=1; lean build 72 registers against the two-tile one's
# 121) — its test, then the W4 sweep at M = 12 and 16 over one- and two-tile launches with the switch off (one tile:
# the per-pair kernel) and on, on the six decode shapes.
#   bash bench/post16_one_tile_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, SWEEP_S (0 skips each)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-90} post16_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py -k post16
CONFIGS=1.2.2,1.4.1,1.2.4,1.8.1,1.4.2,2.2.2,2.4.1,2.8.1
SHAPES=4096x4096,6144x4096,14336x4096,4096x14336,28672x4096,28672x8192
for on in 0 1; do
  export LLMCOMP_MMA_POST16_ONE_TILE=$on
  step ${SWEEP_S:-150} python3 bench/bench_kernels.py --sweep w4 --ms 12,16 \
    --configs $CONFIGS --shapes $SHAPES --out "$OUT/sweep_w4_post16_one_tile_$on.json"
done
grep -E "^sweep" "$OUT/session.log" | cut -c1-150
