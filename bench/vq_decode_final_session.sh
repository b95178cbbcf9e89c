#!/usr/bin/env bash
# One GPU call: the codebook kernel with the next round prefetched into L2 (tests + VQ rows), the frozen-forward
# tests, and the 32-layer 8B decode compiled with the packed attention (GEMMs at batch 1).
set -u
BUILD=${BUILD:-0} . bench/session_common.sh  # no extension build of its own
TESTS="tests/test_codebook_cuda.py tests/test_kernels_cuda.py::test_frozen_forward_is_forward_in_one_graph" \
  TEST_S=120 DECODE_S=0 bash bench/decode_session.sh
timeout ${BENCH_S:-130} python3 bench/bench_kernels.py --out "$OUT/kernels_h200_vq_prefetch.json" --ms 1,16 --bits 4 \
  --float-formats vq2,vq3 2>&1 | grep -E "^(vq|W4)" | tee "$OUT/bench_vq.log" | tail -20
( time timeout ${DECODE_S:-190} python3 -m llmcomp bench decode --synthetic llama3-8b --context 512 --batch 1,16 \
  --steps 64 --compile -o "$OUT/decode_h200_32layers_compiled_packed.json" ) > "$OUT/decode.log" 2>&1
echo "decode rc $?"; grep -E "│ llama|ms/step" "$OUT/decode.log" | tail -3
