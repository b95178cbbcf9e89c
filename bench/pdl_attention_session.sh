#!/usr/bin/env bash
# One GPU call: build; CUDA tests (the split-KV decode attention, every kernel with dependent launch); PDL on/off
# for the W4 GEMMs and an 8B layer's seven linears (bench/pdl_ab.py); the 32-layer decode A/B of attention and PDL
# (bench/decode_ab.py).   bash bench/pdl_attention_session.sh   (on the GPU machine; knobs: TEST_S, PDL_S, AB_S,
# TESTS, AB_ARGS)
set -u
export PYTHONUNBUFFERED=1 LLMCOMP_TRITON_AUTOTUNE=0 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
( time python3 -c "import torch; torch.zeros(1).cuda(); from llmcomp.kernels import uniform_cuda; print('ext', uniform_cuda.extension() is not None, 'pdl', uniform_cuda.dependent_launch())" ) 2>&1 | tail -4
run() {  # run SECONDS LOG CMD...: skipped at 0 seconds
  local s=$1 log=$2; shift 2
  [ "$s" = 0 ] && return
  ( time timeout "$s" "$@" ) > "$OUT/$log" 2>&1; echo "$log rc $?"; tail -${TAIL:-8} "$OUT/$log"
}
run "${TEST_S:-200}" cuda_tests_h200_pdl.log python3 -m pytest -q -p no:cacheprovider -x \
  ${TESTS:-tests/test_decode_attention.py tests/test_kernels_cuda.py tests/test_codebook_cuda.py tests/test_decode_bench.py}
run "${PDL_S:-120}" pdl_ab.log python3 bench/pdl_ab.py --out "$OUT/kernels_h200_pdl.json"
TAIL=20 run "${AB_S:-200}" decode_ab.log python3 bench/decode_ab.py --out "$OUT/decode_h200_ab.json" ${AB_ARGS:-}
