#!/usr/bin/env bash
# One device call (prepared in the forty-fifth session, not run): the early-scale kernels summing each pair of kblocks
# before scaling it (LLMCOMP_MMA_SCALE_PAIR / uniform_cuda.set_scale_pair; half the scale fmas: local SASS of the W4
# bf16 M = 16 loop 590 -> 555 instructions a round, 121 -> 127 registers; M <= 8 two tiles 1 008 -> 992 a kernel) —
# its CUDA test with the early-scale and post-scale ones, the A/B at M = 1, 4, 8, 16 with the layer chains, then the
# compiled 8B W4 decode (lm_head quantized, the norm split on) with the switch off and on at each of BATCHES.
#   bash bench/scale_pair_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, AB_S, DECODE_S (0 skips each;
#   ~100 s, ~120 s, ~140 s a decode, plus a fresh build of ~100 s), BATCHES (default 1; "1 16" brings back more
#   than the 8 files a call returns: run it alone, TEST_S=0 AB_S=0)
set -u
. bench/session_common.sh
TAIL=3 run ${TEST_S:-150} scale_pair_tests.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py \
  -k "scale_pair or scale_early or post_scale"
step ${AB_S:-200} python3 bench/kernel_ab.py --knob pair --ms 1,4,8,16 --out "$OUT/kernels_ab_pair.json"
[ -f "$OUT/kernels_ab_pair.json" ] && python3 - "$OUT/kernels_ab_pair.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["shapes"]:
    print(r["N"], r["K"], r["M"], r["pair_0_us"], r["pair_1_us"], r["speedup"])
for r in d["layer_chain"]:
    print(r["linears"], r["M"], {k: v for k, v in r.items() if k.endswith("_us")})
PY
if [ "${DECODE_S:-140}" != 0 ]; then
  for b in ${BATCHES:-1}; do
    for p in 0 1; do
      LLMCOMP_MMA_SCALE_PAIR=$p FORMATS=uniform BATCH=$b TAG=_pair${p}_b$b DECODE_S=${DECODE_S:-140} BUILD=0 \
        bash bench/lmhead_session.sh 2>&1 | grep -E "ms|rc" | tail -3
    done
  done
fi
