#!/usr/bin/env bash
# Two device calls on one warm H100 that finish what the fifty-third session left: PART=tests runs the CUDA tests its
# time limit cut (tests/test_kv.py, test_linear_kernels.py, test_pyramid_kernel.py, test_vq_speed_robust.py and
# test_kernels_cuda.py's GLU-epilogue tests), then W3 / W2 / vq2 / vq3 at M = 1 with the H100 launch picks;
# PART=table re-times the W4 / MXFP4 / NVFP4 table with the peers and the 8B-shaped decode (bench/h100_session.sh's
# steps 1 and 3; carry .whl for the bitsandbytes column).
#   PART=tests bash bench/h100_finish_session.sh; PART=table bash bench/h100_finish_session.sh   (GPU machine; $OUT)
set -u
case "${PART:-}" in
  tests)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    . bench/session_common.sh
    TAIL=14 run "${TEST_S:-280}" cuda_tests_rest_h100.log python3 -m pytest -q -rf -m cuda -p no:cacheprovider \
      tests/test_kv.py tests/test_linear_kernels.py tests/test_pyramid_kernel.py tests/test_vq_speed_robust.py \
      "tests/test_kernels_cuda.py::test_glu_epilogue_matches_the_reference"
    TABLE=0 DECODE=0 BUILD=0 DEADLINE=${LOW_S:-120} bash bench/h100_session.sh ;;
  table) LOW=0 bash bench/h100_session.sh ;;
  *) echo "PART=tests or PART=table"; exit 2 ;;
esac
