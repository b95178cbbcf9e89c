#!/usr/bin/env bash
# One device call on the H100: W4 28672 x 8192 at M = 12 and 16, the rule's one-wave pick (2, 2, 2) against the
# H100 sweep's best (2, 4, 1) and two others, in one process, three rounds (the fifty-first session's table had
# 52.64 us there, the fifty-fourth's 57.14 with the same code and pick; is it the machine or the launch?).
#   bash bench/h100_m16_check_session.sh   (on the GPU machine; $OUT; ~3 min with a fresh build)
set -u
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
. bench/session_common.sh
for r in 1 2 3; do
  python3 bench/bench_kernels.py --sweep w4 --shapes 28672x8192 --ms 12,16 --configs 2.2.2,2.4.1,2.8.1,1.4.1 \
    --out "$OUT/m16_w4_28672_h100_r$r.json" 2>&1 | grep sweep | cut -c1-150
done
python3 bench/bench_kernels.py --sweep w4 --shapes 28672x8192 --ms 16 --configs 2.2.2,2.4.1 --fp16 \
  --out "$OUT/m16_w4_28672_fp16_h100.json" 2>&1 | grep sweep | cut -c1-150
python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/m16_*.json")):
    print(f.split("/")[-1], " ".join(f"M{r['M']}:{r['rt']}.{r['warps']}.{r['wr']}={r['us']}" for r in json.load(open(f))))
PY
