#!/usr/bin/env bash
# One device call on the H100: the mma kernels' launch sweeps, to check the launch rule (swept on the H200 since the
# second session) on the GPU the targets are stated for. Each step cut to what is left of DEADLINE seconds
# (default 560): W4 at M = 1 and 16, W2 at M = 1, then W4 at M = 4, W3 at M = 1 (the four shapes).
#   bash bench/h100_sweep_session.sh   (on the GPU machine; $OUT)   Knobs: STEPS (default "w4 w2 w4m4 w3").
set -u
T0=$SECONDS; DEADLINE=${DEADLINE:-560}
left() { local l=$((DEADLINE - (SECONDS - T0))); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 0 ? l : 0)); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
. bench/session_common.sh
for s in ${STEPS:-w4 w2 w4m4 w3}; do
  case $s in
    w4) TAIL=9 run "$(left 230)" sweep_w4_h100.log python3 bench/bench_kernels.py --sweep w4 --ms 1,16 \
          --out "$OUT/sweep_w4_h100.json" ;;
    w4m4) TAIL=5 run "$(left 120)" sweep_w4_m4_h100.log python3 bench/bench_kernels.py --sweep w4 --ms 4 \
          --out "$OUT/sweep_w4_m4_h100.json" ;;
    w2|w3) TAIL=5 run "$(left 120)" sweep_${s}_h100.log python3 bench/bench_kernels.py --sweep $s --ms 1 \
          --out "$OUT/sweep_${s}_h100.json" ;;
  esac
done
