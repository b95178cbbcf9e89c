#!/usr/bin/env bash
# One device call: where the W4 M = 1 kernel (fp32 post-scale, elem 3) stands against its own load structure —
# bench/mma_probe.py's base, loads_only (no decode, no mma), w_only (weight loads alone) and db (rounds
# double-buffered in registers), built in parallel, then each timed at M = 1 on the bench's and the 8B decode's
# shapes at launch_config's pick, and db / base at other launches too (fewer warps a block: db's 80 registers).
#   bash bench/probe_m1_session.sh   (on the GPU machine; writes to $OUT)
set -u
BUILD=0 . bench/session_common.sh
V="base loads_only w_only db"
( time ( for v in $V; do timeout ${BUILD_S:-240} python3 bench/mma_probe.py build $v > "$OUT/build_$v.log" 2>&1 & done; wait ) ) 2>&1 | tail -3
tail -n 1 "$OUT"/build_*.log
SH=${SHAPES:-28672x8192,28672x4096,14336x4096,4096x14336,6144x4096,4096x4096}
for v in $V; do
  TAIL=7 run ${TIME_S:-60} probe_m1_$v.log python3 bench/mma_probe.py time $v --post --ms 1 --shapes $SH \
    --out "$OUT/probe_m1_$v.json"
done
for l in 2,2,1 2,8,1 1,4,1; do
  for v in base db; do
    TAIL=2 run ${TIME_S:-60} probe_m1_${v}_$l.log python3 bench/mma_probe.py time $v --post --ms 1 \
      --shapes 28672x8192,28672x4096 --launch $l --out "$OUT/probe_m1_${v}_$l.json"
  done
done
