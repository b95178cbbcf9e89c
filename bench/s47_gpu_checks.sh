#!/usr/bin/env bash
# One device call (forty-seventh session): the CUDA tests of the code the session's CPU fixes touched — KV policies
# (Mustafar's kernel choice, eviction fillers), the PVQ kernel (its prepare decodes indices with the new log2 guide),
# the decode attention and the codebook kernels.   bash bench/s47_gpu_checks.sh   (on the GPU machine; $OUT)
set -u
BUILD=0 . bench/session_common.sh
TAIL=6 run ${TEST_S:-300} gpu_checks.log python3 -m pytest -q -rf -m cuda tests/test_kv.py tests/test_pyramid_kernel.py \
  tests/test_pvq.py tests/test_decode_attention.py tests/test_linearize.py tests/test_linearize_attention.py
