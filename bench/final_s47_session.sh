#!/usr/bin/env bash
# One device call (forty-seventh session) on the final code: the kblock pairs on by default and the two launch-rule
# changes (W3 28672 x 4096 M=1 two tiles; W2 14336 x 4096 M >= 2 two row groups). The whole CUDA test file, the
# W3/W2 kernel table rows at M = 1, 4 on the changed shapes, then the compiled 8B W4 decode at batch 16 (lm_head
# quantized too) with the defaults.
#   bash bench/final_s47_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, TABLE_S, DECODE_S (0 skips each;
#   expected ~180 s, ~40 s, ~140 s, plus a fresh build of ~105 s)
set -u
. bench/session_common.sh
TAIL=4 run ${TEST_S:-300} kernels_cuda_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py
step ${TABLE_S:-90} python3 bench/bench_kernels.py --bits 3,2 --ms 1,4 --float-formats "" \
  --shapes 14336x4096,28672x4096 --out "$OUT/kernels_lowbit_rule.json"
grep -E "W[23]" "$OUT/session.log" | cut -c1-160 | tail -12
FORMATS=uniform BATCH=16 TAG=_b16 DECODE_S=${DECODE_S:-160} BUILD=0 bash bench/lmhead_session.sh 2>&1 | grep -E "ms|rc" | tail -4
