#!/usr/bin/env bash
# One device call for the Triton tl.dot dequant-GEMM (llmcomp/kernels/uniform_dot.py): its CUDA tests, its A/B against
# the CUDA path and bf16 (config's pick), a configuration grid on two shapes, then the mma kernels' CUDA tests.
#   bash bench/dot_session.sh   (on the GPU machine; writes to $OUT)   knobs: TEST_S AB_S GRID_S GRID_SHAPES GRID_MS CUDA_TEST_S
set -u
. bench/session_common.sh
run ${TEST_S:-90} dot_tests.log python3 -m pytest -q tests/test_uniform_dot.py
TAIL=32 run ${AB_S:-150} dot_ab.log python3 bench/dot_ab.py --out "$OUT/dot_ab.json" --shapes "${AB_SHAPES:-4096x4096,14336x4096,4096x14336,28672x8192}" --ms "${AB_MS:-16,64,256}"
TAIL=40 run ${GRID_S:-180} dot_grid.log python3 bench/dot_ab.py --out "$OUT/dot_grid.json" --grid \
  --shapes "${GRID_SHAPES:-4096x4096,28672x8192}" --ms "${GRID_MS:-16,64}"
run ${CUDA_TEST_S:-120} cuda_tests.log python3 -m pytest -q -x tests/test_kernels_cuda.py tests/test_decode_bench.py
