#!/usr/bin/env bash
# One device call after two row tiles a warp above M = 16 (e2cb4d3): the CUDA tests that now reach those launches for
# every format and dtype, the launch sweep on the shapes not yet timed with them, then the full table with peers.
#   bash bench/r2_followup_session.sh   (on the GPU machine; carry .whl for the bitsandbytes column; writes to $OUT)
# Knobs: TEST_S SWEEP_S FP4_S BENCH_S (0 skips a step). All four with the build overrun one 600 s call: run
# `BENCH_S=0 bash bench/r2_followup_session.sh`, then `TEST_S=0 SWEEP_S=0 FP4_S=0 bash bench/r2_followup_session.sh`.
# W (w4, w3, w2) / W4_SHAPES / W4_MS / FP4 (format) / FP4_SHAPES pick what the two sweeps time (default: the first call's).
set -u
. bench/session_common.sh
run ${TEST_S:-170} cuda_tests.log python3 -m pytest -q tests/test_kernels_cuda.py
W=${W:-w4} FP4=${FP4:-mxfp4}
TAIL=12 run ${SWEEP_S:-150} sweep_$W.log python3 bench/bench_kernels.py --sweep $W --out "$OUT/sweep_$W.json" \
  --shapes ${W4_SHAPES:-4096x4096,4096x14336,28672x4096,6144x4096} --ms ${W4_MS:-32,64}
TAIL=8 run ${FP4_S:-90} sweep_$FP4.log python3 bench/bench_kernels.py --sweep $FP4 --out "$OUT/sweep_$FP4.json" \
  --shapes ${FP4_SHAPES:-14336x4096,4096x14336,28672x8192} --ms 64
TAIL=40 run ${BENCH_S:-200} bench.log python3 bench/bench_kernels.py --out "$OUT/kernels.json" --ms 1,16,64 --float-formats mxfp4,nvfp4
