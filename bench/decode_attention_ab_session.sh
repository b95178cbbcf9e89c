#!/usr/bin/env bash
# One GPU call (2026-11-30 night): tests of the traced-linear / packed-GQA change, the packed decode step's two
# attention kernels A/B (8 layers, compiled), and Nsight Compute on the codebook kernel.
set -u
BUILD=${BUILD:-0} . bench/session_common.sh  # no extension build of its own
TESTS="tests/test_codebook_cuda.py tests/test_codebook_kernel.py tests/test_decode_bench.py tests/test_kernels_cuda.py::test_frozen_forward_is_forward_in_one_graph tests/test_kernels_cuda.py::test_custom_op_traces_under_compile" \
  TEST_S=150 DECODE_S=0 bash bench/decode_session.sh
for k in sdpa matmul; do
  ( time LLMCOMP_DECODE_ATTENTION=$k timeout 90 python3 -m llmcomp bench decode --synthetic llama3-8b --layers 8 \
    --context 512 --batch 1,16 --steps 64 --compile -o "$OUT/decode_h200_8layers_attn_$k.json" ) > "$OUT/decode_attn_$k.log" 2>&1
  echo "attn $k rc $?"; grep -E "ms/step|│ llama" "$OUT/decode_attn_$k.log" | tail -3
done
FORMAT=vq2 SHAPES=14336x4096,4096x14336 MS=1 FP16_SHAPES= NCU_S=${NCU_S:-200} bash bench/ncu_session.sh
