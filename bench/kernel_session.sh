#!/usr/bin/env bash
# One device call: build the CUDA extension, check it, sweep its launch parameters, run the benchmark.
#   bash bench/kernel_session.sh   (on the GPU machine; writes to $OUT)
set -u
export PYTHONUNBUFFERED=1 LLMCOMP_TRITON_AUTOTUNE=0
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1; fi
export PYTHONPATH=$PWD:/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
( time python3 -c "import torch; torch.zeros(1).cuda(); from llmcomp.kernels import uniform_cuda; print('ext', uniform_cuda.extension())" ) 2>&1 | tail -4
timeout ${TEST_S:-60} python3 -m pytest -q -x tests/test_kernels_cuda.py -k "mma or odd or compile" 2>&1 | tail -4
if [ "${SWEEP:-1}" = 1 ]; then
  timeout ${SWEEP_S:-150} python3 -c "
import json, os
from llmcomp.eval import kernel_bench as kb
rows = kb.sweep()
json.dump(rows, open(os.environ['OUT'] + '/sweep.json', 'w'), indent=0)" 2>&1 | grep -v Warning | tail -12
fi
timeout ${BENCH_S:-200} python3 bench/bench_kernels.py --out "$OUT/kernels.json" --ms ${MS:-1,4,16,64} --bits ${BITS:-4} 2>&1 | tee "$OUT/bench.log" | tail -18
timeout ${FULLTEST_S:-100} python3 -m pytest -q tests/test_kernels_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -4
