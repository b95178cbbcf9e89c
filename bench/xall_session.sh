#!/usr/bin/env bash
# One GPU call (branch kernel-xall, on kernel-r2): build; the CUDA tests of the M <= 8 changes (two row tiles a warp,
# x staged a warp's whole K range); kernel_ab --knob xall (shapes and the 8B layer chains, M = 1 and 4); the launch
# sweep at M = 1 and 4 with two row tiles a warp among the configurations (SWEEP_S; 0 skips), with x staged too
# when XALL_SWEEP=1.   bash bench/xall_session.sh   (on the GPU machine)
set -u
source "$(dirname "$0")/session_common.sh"
run "${TEST_S:-200}" cuda_tests_xall.log python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
  -k "${TEST_K:-every_launch_config or post_scale or every_m or x_all}"
TAIL=4 run "${AB_S:-150}" kernel_ab_xall.log python3 bench/kernel_ab.py --knob xall --ms 1,4 \
  --out "$OUT/kernels_h200_xall.json"
TAIL=4 run "${SWEEP_S:-200}" sweep_r2.log python3 -c "
import json, os
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import uniform_cuda
uniform_cuda.set_x_all(os.environ.get('XALL_SWEEP') == '1')
rows = kb.sweep(shapes=[*kb.SHAPES, (6144, 4096), (28672, 4096)], ms=(1, 4))
json.dump(rows, open(os.environ['OUT'] + '/kernels_sweep_h200_r2.json', 'w'), indent=0)"
