#!/usr/bin/env bash
# One device call (fortieth session): launches that fit one wave of blocks on 28672 rows, where the rules' picks take
# 1.4-2.3 waves (bench/wave_audit.py --all on the local ptxas registers: W4 at M = 9..16 121-122 registers, 4 blocks
# an SM at 4 warps; W3 at M = 1 1 792 blocks in 924 slots, at M = 2..8 two tiles at 93-99 registers; W2 bf16 (2, 8,
# 1) at 79-80). The sweeps at M <= 16 never timed 2 warps splitting K: (rt, 2, wr) blocks of 64-256 threads fit one
# wave at the same registers. Each format's sweep with the rule's pick beside, bf16 then fp16. Seven files back.
#   bash bench/onewave_session.sh   (on the GPU machine; $OUT)     Knobs: SWEEP_S (seconds a sweep, 0 skips)
set -u
. bench/session_common.sh
ONE=1.2.1,1.2.2,2.2.1,2.2.2,2.2.4
for f in "" --fp16; do
  t=${f:+_fp16}
  step ${SWEEP_S:-60} python3 bench/bench_kernels.py --sweep w4 $f --shapes 28672x8192 --ms 1,12,16 \
    --configs 2.4.1,$ONE --out "$OUT/onewave_w4$t.json"
  for b in 3 2; do
    step ${SWEEP_S:-60} python3 bench/bench_kernels.py --sweep w$b $f --shapes 28672x8192,28672x4096 --ms 1,4,8 \
      --configs 1.4.1,2.4.1,2.8.1,$ONE --out "$OUT/onewave_w$b$t.json"
  done
done
grep -E "^sweep" "$OUT/session.log" | cut -c1-150
