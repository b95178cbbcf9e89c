#!/usr/bin/env bash
# One device call: bench/mma_probe.py's four builds in parallel, then each timed (W4 bf16, M = 4 / 12 / 16).
# ~100 s of builds on 16 cores; a build cut by BUILD_S leaves torch's lock file in its build directory and the timing
# of that variant then waits until its TIME_S runs out.
#   bash bench/mma_probe_session.sh   (on the GPU machine; writes to $OUT)
set -u
BUILD=0 . bench/session_common.sh
( time ( for v in base one_mma x_only no_decode; do timeout ${BUILD_S:-200} python3 bench/mma_probe.py build $v > "$OUT/build_$v.log" 2>&1 & done; wait ) ) 2>&1 | tail -3
tail -n 1 "$OUT"/build_*.log
for v in base one_mma x_only no_decode; do
  TAIL=8 run ${TIME_S:-40} probe_$v.log python3 bench/mma_probe.py time $v --out "$OUT/probe_$v.json"
done
