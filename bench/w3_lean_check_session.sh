#!/usr/bin/env bash
# One device call (written in the forty-fifth session, whose device machine stopped answering during this call): the
# whole CUDA file on the code with the W3 lean loop on by default, then the W3 launch sweep at M = 1, 4 with it on
# (does the launch rule still pick the best?) and the W2 re-time at M = 4 the forty-fourth session asked for
# (14336 x 4096: (2, 4, 2) 11.41 µs against the rule's (2, 4, 1) 11.91 in one sweep).
#   bash bench/w3_lean_check_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, SWEEP_S, W2_S (0 skips each;
#   limits 300 / 150 / 60 s; expected ~200 + ~130 + ~40 s plus a fresh build of ~100 s)
set -u
. bench/session_common.sh
TAIL=4 run ${TEST_S:-300} kernels_cuda_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py
step ${SWEEP_S:-150} python3 bench/bench_kernels.py --sweep w3 --ms 1,4 \
  --configs 1.2.2,1.4.1,1.4.2,1.8.1,1.16.1,2.2.2,2.4.1,2.8.1 \
  --shapes 14336x4096,4096x14336,28672x4096,28672x8192 --out "$OUT/sweep_w3_lean.json"
step ${W2_S:-60} python3 bench/bench_kernels.py --sweep w2 --ms 4 --configs 2.4.1,2.4.2,2.2.2,2.8.1 \
  --shapes 14336x4096,28672x4096 --out "$OUT/sweep_w2_m4.json"
grep -E "^sweep" "$OUT/session.log" | cut -c1-150
