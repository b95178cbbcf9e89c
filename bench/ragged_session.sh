#!/usr/bin/env bash
# One device call for the uniform CUDA kernel's ragged last group (e.g. the bundled model's 576 inputs in groups of
# 128; branch ragged-groups, merged in the fifty-eighth session after these tests passed on an H100): the CUDA kernel
# tests, which cover ragged shapes at every M, every launch and in the post-scale / early-scale kernels, then the
# bundled model's shape decoded (random weights, no GGUF to carry) at W4 g128 (q/k/v/o/gate/up ragged) and g64 (none
# ragged) against bf16, compiled, batch 1 and 16. H100, fifty-eighth session: 2.26x / 1.97x bf16 at g128
# (bench/results/decode_synthetic_smollm2_w4g128_compiled_h100_s58.json); 0.59x at batch 1 before, on the Triton
# fallback (decode_bundled_*_h100_s57.json).
#   bash bench/ragged_session.sh   (GPU machine; $OUT; TEST_S=0 skips the tests)
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
. bench/session_common.sh
TAIL=4 run "${TEST_S:-300}" cuda_tests_ragged.log python3 -m pytest -x -q -p no:cacheprovider \
  tests/test_kernels_cuda.py tests/test_kernel_layouts.py
for g in 128 64; do
  TAIL=3 run "${DECODE_S:-150}" "decode_smollm2_w4g$g.log" python3 -m llmcomp bench decode --synthetic smollm2-135m \
    --group "$g" --compile --batch 1,16 -o "$OUT/decode_smollm2_w4g${g}_compiled.json"
done
