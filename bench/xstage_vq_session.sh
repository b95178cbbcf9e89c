#!/usr/bin/env bash
# Branches kernel-vq + kernel-xstage, first GPU call: build, their CUDA tests, then the M > 16 sweep with x staged
# and not (LLMCOMP_MMA_XSTAGE=0), one M a process (a timeout loses one file). Second call: the VQ rows,
#   SWEEP=0 FULLTEST_S=0 MS=1,16,64 FLOATS=vq2,vq3 bash bench/kernel_session.sh
set -u
. bench/session_common.sh
timeout ${TEST_S:-150} python3 -m pytest -q tests/test_codebook_cuda.py tests/test_kernels_cuda.py \
  -k "${TEST_K:-codebook or launch_config or post_scale}" 2>&1 | tee "$OUT/tests.log" | tail -3
for xs in 1 0; do
  for m in ${SWEEP_MS:-64 32}; do
    LLMCOMP_MMA_XSTAGE=$xs timeout ${SWEEP_S:-80} python3 -c "
import json, os
from llmcomp.eval import kernel_bench as kb
json.dump(kb.sweep(ms=($m,)), open(os.environ['OUT'] + '/sweep_m${m}_xs$xs.json', 'w'), indent=0)" 2>&1 | grep -v Warning | tail -4
  done
done
