#!/usr/bin/env bash
# One device call (prepared in the forty-fourth session, not run): the 3-bit post-scale kernels (kind 8) through the
# lean loop (LLMCOMP_MMA_W3_LEAN / uniform_cuda.set_w3_lean; the high-bit plane through its own pointers) — its CUDA
# test and the post-scale ones, then W3 off / on at M = 1, 4, 8 on the kernel-table shapes and the 8B layer chains
# (bench/kernel_ab.py --knob w3lean --bits 3).
#   bash bench/w3_lean_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, AB_S (0 skips each)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-150} w3_lean_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py \
  -k "w3_lean or post_scale or every_launch"
step ${AB_S:-240} python3 bench/kernel_ab.py --knob w3lean --bits 3 --ms 1,4,8 --out "$OUT/kernels_ab_w3lean.json"
grep -E "speedup|roofline_pct" "$OUT/session.log" | cut -c1-170
