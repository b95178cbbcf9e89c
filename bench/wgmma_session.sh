#!/usr/bin/env bash
# One device call: the warpgroup (wgmma) kernel — bench/wgmma_probe.cu (the descriptor convention it relies on), the
# extension built for sm_90a, its CUDA tests, A/B against the mma.sync kernels at their default launches
# (bench/kernel_ab.py --knob wgmma) and a launch sweep with it on.   bash bench/wgmma_session.sh   (GPU machine; $OUT)
# Knobs: TEST_S, AB_S, SWEEP_S, REGRESS_S (seconds, 0 skips), AB_MS (default 16,32,64), SWEEP_MS (16,64).
set -u
. bench/session_common.sh
nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a bench/wgmma_probe.cu -o /tmp/wgmma_probe > "$OUT/probe.log" 2>&1 &&
  /tmp/wgmma_probe >> "$OUT/probe.log" 2>&1; tail -8 "$OUT/probe.log"
python3 -c "from llmcomp.kernels import uniform_cuda as u; print('wgmma kernel', u.set_wgmma(True))"
TAIL=4 run ${TEST_S:-150} tests.log python3 -m pytest -q -x tests/test_kernels_cuda.py -k wgmma
TAIL=40 run ${AB_S:-180} ab.log python3 bench/kernel_ab.py --knob wgmma --no-chains --ms "${AB_MS:-16,32,64}" \
  --out "$OUT/kernels_h200_wgmma_ab.json"
TAIL=14 run ${SWEEP_S:-120} sweep.log env LLMCOMP_MMA_WGMMA=1 python3 bench/bench_kernels.py --sweep w4 \
  --ms "${SWEEP_MS:-16,64}" --out "$OUT/kernels_sweep_h200_wgmma.json"
TAIL=4 run ${REGRESS_S:-0} regress.log python3 -m pytest -q -x tests/test_kernels_cuda.py \
  -k "every_launch or every_m or post_scale"
