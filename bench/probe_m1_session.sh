#!/usr/bin/env bash
# One device call: where the W4 M = 1 kernel (fp32 post-scale, elem 3) stands against its own load structure —
# bench/mma_probe.py's base, loads_only (no decode, no mma), w_only (weight loads alone), db (rounds double-buffered
# in registers), refill and refill64 (a kblock's registers refilled right after its math), built in parallel, then
# each timed at M = 1 on the bench's and the 8B decode's shapes at launch_config's pick, and base / db / w_only at
# other launches too. Everything goes to one log, probe_m1.log (a call brings back at most 8 files, and no file
# whose name has a comma). Results of 2026-12-01: bench/results/probe_m1_h200_*.log, kernels_h200_notes.md.
#   bash bench/probe_m1_session.sh   (on the GPU machine; writes to $OUT)   Knobs: V (variants), SHAPES, LAUNCHES.
set -u
BUILD=0 . bench/session_common.sh
V=${V:-base loads_only w_only db refill refill64}
( time ( for v in $V; do
           timeout ${BUILD_S:-300} python3 bench/mma_probe.py build $v > "$OUT/build_$v.log" 2>&1 &
         done; wait ) ) 2>&1 | tail -3
tail -qn 1 "$OUT"/build_*.log
SH=${SHAPES:-28672x8192,28672x4096,14336x4096,4096x14336,6144x4096,4096x4096}
for v in $V; do
  timeout ${TIME_S:-60} python3 bench/mma_probe.py time $v --post --ms 1 --shapes $SH >> "$OUT/probe_m1.log" 2>&1
done
for l in ${LAUNCHES:-2,2,1 2,8,1 1,8,1}; do
  for v in base db w_only; do
    timeout ${TIME_S:-60} python3 bench/mma_probe.py time $v --post --ms 1 --shapes 28672x8192,4096x14336 --launch $l \
      >> "$OUT/probe_m1.log" 2>&1
  done
done
grep " us$" "$OUT/probe_m1.log"
