#!/usr/bin/env bash
# One GPU call: build; the launch sweep of the very-many-row shapes at M = 1 for the other weight formats of the
# mma kernel (W3, W2, MXFP4, NVFP4: does two row tiles a warp pay there too?); then the CUDA test files.
#   bash bench/r2_formats_session.sh   (on the GPU machine; knobs SWEEP_S, TEST_S; 0 skips)
set -u
source "$(dirname "$0")/session_common.sh"
TAIL=10 run "${SWEEP_S:-170}" sweep_r2_formats.log python3 -c "
import json, os
from llmcomp.eval import kernel_bench as kb
shapes = [(28672, 4096), (28672, 8192)]
rows = kb.sweep(shapes=shapes, ms=(1,), bits=3) + kb.sweep(shapes=shapes[:1], ms=(1,), bits=2)
for f in ('mxfp4', 'nvfp4'):
    rows += kb.sweep(shapes=shapes, ms=(1,), fmt=f)
json.dump(rows, open(os.environ['OUT'] + '/kernels_sweep_h200_r2_formats.json', 'w'), indent=0)"
run "${TEST_S:-200}" cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
  tests/test_decode_attention.py tests/test_decode_bench.py tests/test_codebook_cuda.py
