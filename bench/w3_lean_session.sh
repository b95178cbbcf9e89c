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
# the same tests with the switch on: the lean kernels against the reference too
TAIL=3 run ${TEST_S:-150} w3_lean_on_tests.log env LLMCOMP_MMA_W3_LEAN=1 python3 -m pytest -q -rf -m cuda \
  tests/test_kernels_cuda.py -k "post_scale or every_launch or register_bound"
step ${AB_S:-240} python3 bench/kernel_ab.py --knob w3lean --bits 3 --ms 1,4,8 --out "$OUT/kernels_ab_w3lean.json"
python3 - "$OUT/kernels_ab_w3lean.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["shapes"]:
    print(r["N"], r["K"], r["M"], r["w3lean_0_us"], r["w3lean_1_us"], r["speedup"])
for r in d["layer_chain"]:
    print(r["linears"], r["M"], {k: v for k, v in r.items() if k.endswith("_us")})
PY
