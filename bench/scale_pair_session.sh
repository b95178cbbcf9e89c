#!/usr/bin/env bash
# One device call (prepared in the forty-fifth session, not run): the early-scale kernels summing each pair of kblocks
# before scaling it (LLMCOMP_MMA_SCALE_PAIR / uniform_cuda.set_scale_pair; half the scale fmas: local SASS of the W4
# bf16 M = 16 kernel 1 344 -> 1 304 instructions, 96 -> 64 FFMA, 121 -> 127 registers; M <= 8 two tiles 1 008 ->
# 992) — its CUDA test and the early-scale and post-scale ones, then the A/B at M = 1, 4, 8, 16 with the layer chains.
#   bash bench/scale_pair_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, AB_S (0 skips each; ~100 + ~90 s
#   plus a fresh build of ~100 s)
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
