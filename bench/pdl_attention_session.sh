#!/usr/bin/env bash
# One GPU call: build; CUDA tests (the split-KV decode attention, the kernels; LLMCOMP_PDL=1 for dependent launch); PDL on/off
# for the W4 GEMMs and an 8B layer's seven linears (bench/kernel_ab.py); the 32-layer decode A/B of attention and PDL
# (bench/decode_ab.py).   bash bench/pdl_attention_session.sh   (on the GPU machine; knobs: TEST_S, PDL_S, AB_S,
# TESTS, AB_ARGS)
set -u
source "$(dirname "$0")/session_common.sh"
run "${TEST_S:-200}" cuda_tests_h200_pdl.log python3 -m pytest -q -p no:cacheprovider -x \
  ${TESTS:-tests/test_decode_attention.py tests/test_kernels_cuda.py tests/test_codebook_cuda.py tests/test_decode_bench.py}
run "${PDL_S:-120}" pdl_ab.log python3 bench/kernel_ab.py --out "$OUT/kernels_h200_pdl.json"
TAIL=20 run "${AB_S:-200}" decode_ab.log python3 bench/decode_ab.py --out "$OUT/decode_h200_ab.json" ${AB_ARGS:-}
