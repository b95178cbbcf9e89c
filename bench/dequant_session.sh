#!/usr/bin/env bash
# One device call (forty-second session): the dequantize kernel's staged stores (tests, then bench/dequant_ab.py: the
# kernel alone and the M = 256 prefill layer, staged against unstaged), then the E2M1 launches at M = 12 and 16 on
# the byte-scaled kernel (kind 9) across the row regimes, for the M = 9..16 rule; TABLE_S: the kernel table at M = 16
# (W4 and its peers, MXFP4, NVFP4) through the rules.
#   bash bench/dequant_session.sh   (on the GPU machine; $OUT)
# Knobs: TEST_S, AB_S, SWEEP_S, TABLE_S (seconds; 0 skips each), TEST_K (pytest -k), AB_ARGS (dequant_ab.py's)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-120} dequant_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py \
  -k "${TEST_K:-dequant_stage or every_m}"
step ${AB_S:-150} python3 bench/dequant_ab.py --out "$OUT/dequant_stage.json" ${AB_ARGS:-}
CONFIGS=1.4.1,1.8.1,1.16.1,2.4.1,2.4.2,2.8.1,2.16.1,2.2.2
step ${SWEEP_S:-100} python3 bench/bench_kernels.py --sweep mxfp4 --ms 12,16 --configs $CONFIGS \
  --shapes 4096x4096,6144x4096,14336x4096,28672x4096,28672x8192 --out "$OUT/sweep_mxfp4_m16.json"
step ${SWEEP_S:-100} python3 bench/bench_kernels.py --sweep nvfp4 --ms 12,16 --configs $CONFIGS \
  --shapes 6144x4096,28672x4096,28672x8192 --out "$OUT/sweep_nvfp4_m16.json"
step ${TABLE_S:-0} python3 bench/bench_kernels.py --bits 4 --float-formats mxfp4,nvfp4 --ms 16 \
  --out "$OUT/kernels_m16.json"
grep -E "plain_a" "$OUT/session.log"
grep -E "^sweep|M=16 " "$OUT/session.log" | cut -c1-150
