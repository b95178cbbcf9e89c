#!/usr/bin/env bash
# One device call (forty-seventh session): the whole CUDA test file with the kblock pairs on
# (LLMCOMP_MMA_SCALE_PAIR=1), the condition for making them the default, then the two launch-rule questions the
# sweeps of the forty-fourth and forty-sixth sessions raised, each timed in one process with both launches:
# W3 28672 x 4096 at M = 1, 2 ((1, 4, 1) the rule, (2, 4, 1) the sweeps' best), bf16 and fp16; W2 14336 x 4096 at
# M = 2..8 ((2, 4, 1) the rule, (2, 4, 2)), bf16 and fp16.
#   bash bench/pair_default_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, SWEEP_S (0 skips each;
#   expected ~140 s of tests and ~60 s of sweeps, plus a fresh build of ~120 s)
set -u
. bench/session_common.sh
TAIL=4 run ${TEST_S:-360} kernels_cuda_tests_pair_on.log env LLMCOMP_MMA_SCALE_PAIR=1 \
  python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py
for f in "" --fp16; do
  t=${f:+_fp16}
  step ${SWEEP_S:-60} python3 bench/bench_kernels.py --sweep w3 $f --ms 1,2 --configs 1.4.1,2.4.1 \
    --shapes 28672x4096 --out "$OUT/rule_w3_28672x4096$t.json"
  step ${SWEEP_S:-60} python3 bench/bench_kernels.py --sweep w2 $f --ms 2,3,4,5,6,8 --configs 2.4.1,2.4.2 \
    --shapes 14336x4096 --out "$OUT/rule_w2_14336x4096$t.json"
done
python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/rule_*.json")):
    for r in json.load(open(f)):
        print(f.rsplit("/", 1)[1], r["N"], r["K"], r["M"], (r["rt"], r["warps"], r["wr"]), r["us"])
PY
