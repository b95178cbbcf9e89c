#!/usr/bin/env bash
# One device call (prepared 2026-12-01, not yet run): does __launch_bounds__(THREADS, 1) — which removes the one-tile
# post-scale kernel's spill in a local compile — let the one-row-tile shapes take the post-scale kernel at M = 9..16,
# and what does it do to every other launch? Builds the extension and the lb1 probe in parallel, then per build:
# the post-scale kernel forced at one row tile (14336 x 4096 at (1, 4, 1), 6144 x 4096 at (1, 8, 1)), the per-pair
# kernel at the same launches, and the default picks on the table's shapes at M = 1 / 16 / 64.
#   bash bench/lb1_session.sh   (on the GPU machine; $OUT)   Knob: TIME_S (seconds a build's timing, default 120).
set -u
BUILD=0 . bench/session_common.sh
build_beside lb1
for v in base lb1; do
  TAIL=30 run ${TIME_S:-120} probe_$v.log bash -c "
    P='python3 bench/mma_probe.py time $v --ms 9,12,16'
    \$P --shapes 14336x4096 --launch 1,4,1 --post && \$P --shapes 14336x4096 --launch 1,4,1 &&
    \$P --shapes 6144x4096 --launch 1,8,1 --post && \$P --shapes 6144x4096 --launch 1,8,1 &&
    python3 bench/mma_probe.py time $v --ms 1,16,64 --shapes 4096x4096,14336x4096,4096x14336,28672x8192"
done
