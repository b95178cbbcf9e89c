#!/usr/bin/env bash
# One GPU call: build; CUDA tests (decode attention, decode bench with dependent launch, stacked linears); the split-KV
# attention kernel alone by pipeline depth (bench/decode_attention_ab.py); the decode A/B of dependent launch at
# batch 16 (bench/decode_ab.py); the 32-layer compiled decode as the CLI runs it (dependent launch on by default).
#   bash bench/pdl_decode_session.sh   (on the GPU machine; knobs: TEST_S, ATT_S, AB_S, CLI_S; 0 skips)
set -u
source "$(dirname "$0")/session_common.sh"
run "${TEST_S:-150}" cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
  tests/test_decode_bench.py tests/test_kernels_cuda.py -k "${TEST_K:-attention or decode or frozen or fuse}"
TAIL=6 run "${ATT_S:-60}" decode_attention_ab.log python3 bench/decode_attention_ab.py --out "$OUT/decode_attention_h200.json"
TAIL=6 run "${AB_S:-0}" decode_ab.log python3 bench/decode_ab.py --batch 16 --bf16 "" --w4 triton:0:1,triton:1:1:1 \
  --out "$OUT/decode_h200_ab_pdl_b16.json"
TAIL=30 run "${CLI_S:-300}" decode_cli.log python3 -m llmcomp bench decode --synthetic llama3-8b --compile --breakdown \
  --out "$OUT/decode_h200_32layers_compiled_pdl.json"
