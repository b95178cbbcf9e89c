#!/usr/bin/env bash
# One device call: the l2pf probe (each round prefetches the next round's weights into L2) built beside the extension,
# both timed at launch_config's picks on the table's shapes and the stacked decode shapes, M = 1 / 16 / 64.
#   bash bench/l2pf_session.sh   (on the GPU machine; $OUT)   Knob: TIME_S (seconds a build's timing, default 110).
set -u
BUILD=0 . bench/session_common.sh
build_beside l2pf
for v in base l2pf; do
  TAIL=20 run ${TIME_S:-110} probe_$v.log python3 bench/mma_probe.py time $v --ms ${MS:-1,16,64} \
    --shapes 4096x4096,14336x4096,4096x14336,28672x8192,28672x4096,6144x4096 --out "$OUT/l2pf_$v.json"
done
