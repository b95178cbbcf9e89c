#!/usr/bin/env bash
# One GPU call: build, CUDA tests (TESTS, serial: pytest-xdist workers stalled on the H200 machine), the 8B-shaped W4
# decode with the layers compiled (quantized linears traced as their kernels, the packed-GQA attention) and its
# --breakdown, and optionally the eager breakdown.   bash bench/decode_session.sh   (on the GPU machine)
# Knobs (env): TESTS (pytest paths), TEST_S / DECODE_S / EAGER_S (time limits; 0 skips), DECODE_ARGS (extra options).
set -u
source "$(dirname "$0")/session_common.sh"
run "${TEST_S:-250}" kernels_cuda_tests_h200.log python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernels_cuda.py}
D="python3 -m llmcomp bench decode --synthetic llama3-8b --context 512"
run "${DECODE_S:-220}" decode_compiled.log $D --batch 1,16 --steps 64 --compile --breakdown ${DECODE_ARGS:-} \
  -o "$OUT/decode_h200_32layers_compiled_traced.json"
run "${EAGER_S:-0}" decode_eager.log $D --batch 1 --steps 32 --breakdown -o "$OUT/decode_h200_breakdown_packed.json"
