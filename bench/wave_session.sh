#!/usr/bin/env bash
# One device call (thirty-ninth session): the 3-bit one-tile x 4-warp launch with its register bound off and on
# (CUDA test test_register_bound_gives_the_same_bits, then bench/wave_check.py on 14336 and 28672 rows, bf16 and
# fp16, plain / norm producer / GLU consumer), then the 2-bit launch rule's sweeps on the two shapes the default
# sweeps leave out (6144 x 4096, 28672 x 4096) at M = 3, 5, 7 (bf16) and M = 1, 8 (fp16). Seven files back: one log,
# six JSON.
#   bash bench/wave_session.sh   (on the GPU machine; $OUT)     Knobs: TEST_S, WAVE_S, SWEEP_S (seconds, 0 skips)
set -u
. bench/session_common.sh
step ${TEST_S:-60} python3 -m pytest -q -rf tests/test_kernels_cuda.py -k register_bound
step ${WAVE_S:-90} python3 bench/wave_check.py --shapes 14336x4096 --ms 1,3 --out "$OUT/wave_w3_14336.json"
step ${WAVE_S:-60} python3 bench/wave_check.py --shapes 28672x4096 --ms 1 --out "$OUT/wave_w3_28672.json"
CONFIGS=1.16.1,2.16.1,1.8.1,2.8.1,1.4.1,2.4.1
for b in 3 2; do
  step ${SWEEP_S:-55} python3 bench/bench_kernels.py --sweep w$b --shapes 6144x4096,28672x4096 --ms 3,5,7 \
    --configs $CONFIGS --out "$OUT/rule_m357_w$b.json"
  step ${SWEEP_S:-55} python3 bench/bench_kernels.py --sweep w$b --fp16 --shapes 6144x4096,28672x4096 --ms 1,8 \
    --configs $CONFIGS --out "$OUT/sweep_fp16_w$b.json"
done
grep -E "passed|failed|error|^sweep|bound7(_r2)?=" "$OUT/session.log" | cut -c1-140
