#!/usr/bin/env bash
# One device call: the weight ring (LLMCOMP_MMA_RING, M > 8) — CUDA tests with it on, A/B against the register rounds
# (bench/kernel_ab.py --knob ring), and the ring_u1 probe (its loop not unrolled) built beside the extension.
#   bash bench/ring_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, AB_S, PROBE_S, AB_MS, PROBE_MS.
set -u
BUILD=0 . bench/session_common.sh
( time ( python3 -c "from llmcomp.kernels import uniform_cuda; print('ext', uniform_cuda.extension() is not None)" \
           > "$OUT/build.log" 2>&1 &
         [ "${PROBE_S:-40}" = 0 ] || timeout 300 python3 bench/mma_probe.py build ring_u1 > "$OUT/build_u1.log" 2>&1 &
         wait ) ) 2>&1 | tail -3
tail -n 2 "$OUT"/build*.log
LLMCOMP_MMA_RING=1 TAIL=3 run ${TEST_S:-150} tests.log python3 -m pytest -q -x tests/test_kernels_cuda.py \
  -k "${TEST_K:-post_scale or every_launch or every_m}"
TAIL=40 run ${AB_S:-200} ab.log python3 bench/kernel_ab.py --knob ring --ms "${AB_MS:-16,32,64}" \
  --out "$OUT/kernels_h200_ring.json"
for v in base ring_u1; do
  LLMCOMP_MMA_RING=1 TAIL=7 run ${PROBE_S:-40} probe_$v.log python3 bench/mma_probe.py time $v --ms "${PROBE_MS:-16,64}"
done
