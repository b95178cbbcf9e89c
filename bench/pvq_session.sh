#!/usr/bin/env bash
# One device call for the PVQ kernel's open items (notes' Next, thirty-third session): its CUDA tests (the traced
# forward and the escapes-apart switch included), 28672 x 8192 at M = 1 / 32 with a few launches, and pvq3 with its
# escapes inside the kernel against LLMCOMP_PVQ_ESCAPES_APART=1 (each beside bf16 and dequantize + cuBLAS).
#   bash bench/pvq_session.sh   (on the GPU machine; $OUT)   Knobs: TESTS_S, BIG_S, AB_S (seconds, 0 skips).
set -u
. bench/session_common.sh
TAIL=6 run ${TESTS_S:-300} pvq_tests.log python3 -m pytest -q -m cuda tests/test_pyramid_kernel.py
TAIL=6 run ${BIG_S:-150} sweep_big.log python3 bench/pvq_launch.py --baselines --out "$OUT/sweep_pvq2_big.json" \
  --shapes 28672x8192 --ms 1,32 --launches 2x8x1,4x8x1,4x16x1,2x16x1
for apart in 0 1; do
  TAIL=10 run ${AB_S:-100} pvq3_apart$apart.log env LLMCOMP_PVQ_ESCAPES_APART=$apart python3 bench/pvq_launch.py \
    --format pvq3 --baselines --out "$OUT/sweep_pvq3_apart$apart.json" --ms 1,16,32 --launches 4x8x1 \
    --shapes 4096x4096,14336x4096,4096x14336
done
