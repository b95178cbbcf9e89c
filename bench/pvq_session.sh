#!/usr/bin/env bash
# One device call (thirty-fourth session, last form): the PVQ kernel's CUDA tests with its escapes one a lane at one
# row of x and spread over the lanes as (row, escape) pairs above, then pvq3 (dense escapes) at M = 1 / 8 / 16 over a
# few launches and pvq2 at M = 1, each beside bf16 and dequantize + cuBLAS.
#   bash bench/pvq_session.sh   (on the GPU machine; $OUT)   Knobs: TESTS_S, PVQ3_S, PVQ2_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=6 run ${TESTS_S:-90} pvq_tests.log python3 -m pytest -q -m cuda tests/test_pyramid_kernel.py
TAIL=12 run ${PVQ3_S:-130} pvq3.log python3 bench/pvq_launch.py --format pvq3 --baselines --out "$OUT/sweep_pvq3.json" \
  --ms 1,8,16 --launches 2x8x1,2x16x1,4x8x1,1x8x1 --shapes 4096x4096,14336x4096,4096x14336
TAIL=8 run ${PVQ2_S:-40} pvq2.log python3 bench/pvq_launch.py --baselines --out "$OUT/sweep_pvq2.json" \
  --ms 1 --shapes 4096x4096,14336x4096,4096x14336,28672x8192
