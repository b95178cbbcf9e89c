#!/usr/bin/env bash
# One device call: the fp32 post-scale kernel at M = 9..16 (two token tiles a warp) — its CUDA tests, then A/B against
# the per-pair-scale kernel (bench/kernel_ab.py --knob post), and the u2 probe (rounds of 2 kblocks at two row tiles)
# built beside the extension and timed against it.   bash bench/post16_session.sh   (on the GPU machine; $OUT)
# Knobs: TEST_S, AB_S, PROBE_S (seconds, 0 skips), AB_MS (default 9,12,16), TEST_K (pytest -k).
set -u
BUILD=0 . bench/session_common.sh
build_beside $([ "${PROBE_S:-40}" = 0 ] || echo u2)
TAIL=3 run ${TEST_S:-200} tests.log python3 -m pytest -q -x tests/test_kernels_cuda.py \
  -k "${TEST_K:-post_scale or every_launch or every_m}"
TAIL=30 run ${AB_S:-240} ab.log python3 bench/kernel_ab.py --knob post --variants 16,0 --ms "${AB_MS:-9,12,16}" \
  --out "$OUT/kernels_h200_post16.json"
for v in base u2; do TAIL=7 run ${PROBE_S:-40} probe_$v.log python3 bench/mma_probe.py time $v; done
