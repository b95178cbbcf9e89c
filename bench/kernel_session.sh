#!/usr/bin/env bash
# One device call: build the CUDA extension, check it, (optionally) sweep its launch parameters, run the benchmark.
#   bash bench/kernel_session.sh   (on the GPU machine; writes to $OUT)
# Knobs (env): TEST_S, TEST_K (pytest -k filter), FP16=1 (fp16-activation columns too), SWEEP=0|1 + SWEEP_MS + SWEEP_S, MS, BITS, FLOATS (empty: none; e.g. mxfp4,nvfp4,vq2,vq3), BENCH_S, LOWBITS (e.g. 3,2; timed at
# M=1 only) + LOW_S, DECODE_LAYERS (+ DECODE_S, DECODE_FORMATS: llmcomp bench decode on that many
# Llama-3-8B layers, per format; DECODE_COMPILE=1 times them with compiled decoder layers too),
# FULLTEST_S (0 skips the full CUDA test file).
set -u
. bench/session_common.sh
timeout ${TEST_S:-120} python3 -m pytest -q -x tests/test_kernels_cuda.py tests/test_codebook_kernel.py -k "${TEST_K:-mma or odd or compile or e2m1 or launch_config or variant or kernel_matches}" 2>&1 | tee "$OUT/tests.log" | tail -25
if [ "${SWEEP:-1}" = 1 ]; then
  timeout ${SWEEP_S:-150} python3 bench/bench_kernels.py --sweep w4 --ms "${SWEEP_MS:-1,16}" --out "$OUT/sweep.json" \
    2>&1 | grep -v Warning | tail -12
fi
timeout ${BENCH_S:-200} python3 bench/bench_kernels.py --out "$OUT/kernels.json" --ms ${MS:-1,4,16,64} --bits ${BITS:-4} --float-formats "${FLOATS-mxfp4,nvfp4}" ${FP16:+--fp16} 2>&1 | tee "$OUT/bench.log" | tail -40
if [ -n "${LOWBITS:-}" ]; then
  timeout ${LOW_S:-60} python3 bench/bench_kernels.py --out "$OUT/kernels_lowbit.json" --ms 1 --bits "$LOWBITS" --float-formats "" 2>&1 | tee "$OUT/bench_lowbit.log" | tail -10
fi
if [ -n "${DECODE_LAYERS:-}" ]; then  # e.g. 32: the whole Llama-3-8B shape, W4 g128 vs bf16
  for f in ${DECODE_FORMATS:-uniform}; do  # e.g. "uniform mxfp4"
    timeout ${DECODE_S:-240} python3 -m llmcomp bench decode --synthetic llama3-8b --layers "$DECODE_LAYERS" \
      --format "$f" --batch 1,16 --context 512 --steps 64 --out "$OUT/decode_$f.json" 2>&1 | tail -8
    if [ "${DECODE_COMPILE:-0}" = 1 ]; then
      timeout ${DECODE_S:-240} python3 -m llmcomp bench decode --synthetic llama3-8b --layers "$DECODE_LAYERS" \
        --format "$f" --batch 1,16 --context 512 --steps 64 --compile --out "$OUT/decode_${f}_compiled.json" 2>&1 | tail -8
    fi
  done
fi
if [ "${FULLTEST_S:-100}" != 0 ]; then
  timeout ${FULLTEST_S:-100} python3 -m pytest -q tests/test_kernels_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -4
fi
