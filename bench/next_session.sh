#!/usr/bin/env bash
# One device call: the post-scale kernels' lean instantiations (M <= 16; LLMCOMP_MMA_LEAN=1, uniform_cuda.set_lean;
# LEAN in csrc/uniform_mma.cuh: per-tile weight pointers advanced a round, x's and the scales' row pointers kept in
# registers, the group index without the lane's offset — 17 % fewer instructions in the gate/up call's steady loop).
# Its CUDA test (the default's bits, every launch, plain / GLU / both norm-split sides) with the norm and GLU tests
# beside, the kernel A/B at M = 1 and 16 in one process with dependent launch as the decode runs it
# (bench/kernel_ab.py --knob lean: the table's shapes, the stacked q/k/v and gate/up, the 8B layer's chains), then —
# only where the fused layer chain at M = 1 is at least 1 % faster lean — the compiled 8B W4 decode (lm_head
# quantized) at batch 1 off (tag _s23_lean0_b1) and on (_s23_lean1_b1) from one build. ~9 min on a fresh machine.
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, AB_S, DECODE_S (seconds, 0 skips), LEANS
#   (the decode's settings, default "0 1"; FORCE=1 runs them whatever the chain says).
set -u
. bench/session_common.sh
TAIL=4 run ${TEST_S:-200} tests_lean.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py \
  -k "lean or norm_split or glu_epilogue"
TAIL=20 run ${AB_S:-200} kernel_ab_lean.log env LLMCOMP_PDL=1 python3 bench/kernel_ab.py --knob lean --ms 1,16 \
  --out "$OUT/kernels_h200_lean.json"
[ "${FORCE:-0}" = 1 ] || python3 -c "import json, sys
c = [r for r in json.load(open('$OUT/kernels_h200_lean.json'))['layer_chain'] if r['linears'] == 'fused'][0]
print('fused chain', c['w4_lean_0_us'], c['w4_lean_1_us'])
sys.exit(0 if c['w4_lean_1_us'] < 0.99 * c['w4_lean_0_us'] else 1)" || LEANS=
for v in ${LEANS-0 1}; do
  LLMCOMP_MMA_LEAN=$v BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-140} TAG=_s23_lean${v}_b1 BUILD=0 \
    bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys" | tail -4
done
