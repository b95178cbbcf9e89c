#!/usr/bin/env bash
# One device call on the H100: every CUDA-marked test (tests/, -m cuda: the mma / codebook / PVQ / Triton kernels
# against their references, the decode attention, the compiled decode's checks), time-limited to TEST_S (default
# 540 s with the build).   bash bench/h100_tests_session.sh   (on the GPU machine; $OUT)
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
. bench/session_common.sh
TAIL=12 run "${TEST_S:-420}" cuda_tests_h100.log python3 -m pytest -q -rf -m cuda -p no:cacheprovider tests/
