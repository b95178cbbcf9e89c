#!/usr/bin/env bash
# One device call (fiftieth session), every step cut to what is left of DEADLINE seconds (default 540), in order:
# (1) the extension and the xtile probe built in parallel, then the probe against the kernel as it is at M = 64 / 32
#     (launches LAUNCHES, output checksums); (2) the row-group counts that are not powers of two on
#     28672 x 8192 (m64_session.sh's first sweep); (3) the M = 64 / 32 table rows with bf16 cuBLAS beside them;
#     (4) Nsight Compute of the M = 64 kernel on 28672 x 8192 with PC sampling (NCU=0 skips it).
# Everything under $OUT is packed into one s50.tgz at the end (a call returns at most 8 files).
#   bash bench/s50_session.sh   (on the GPU machine)
set -u
T0=$SECONDS; DEADLINE=${DEADLINE:-540}
left() { local l=$((DEADLINE - (SECONDS - T0))); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 0 ? l : 0)); }
BUILD=0 . bench/session_common.sh
build_beside xtile
L=${LAUNCHES:-2,1,8+1,1,8+2,2,4+1,2,4}
for v in base xtile; do
  TAIL=26 run "$(left 90)" probe_$v.log python3 bench/mma_probe.py time $v \
    --shapes 28672x8192,14336x4096,4096x4096 --ms 64,32 --launch "$L" --out "$OUT/probe_$v.json"
done
run "$(left 80)" sweep_w4.log python3 bench/bench_kernels.py --sweep w4 --ms 64,32 --shapes 28672x8192 \
  --configs 2.1.8,2.1.7,1.1.8,1.1.7 --out "$OUT/sweep_w4_m64_wr.json"
TAIL=12 run "$(left 100)" table.log python3 bench/bench_kernels.py --shapes 28672x8192,14336x4096,4096x4096 \
  --ms 64,32 --bits 4 --float-formats "" --out "$OUT/kernels_m64.json"
N=$(left 150)
[ "${NCU:-1}" = 0 ] || [ "$N" -lt 40 ] || SHAPES=28672x8192 MS=64 FP16_SHAPES= SOURCE=uniform_mma_kernel SOURCE_M=64 \
  NCU_S=$((N / 2)) bash bench/ncu_session.sh 2>&1 | tail -30
(cd "$OUT" && tar czf /tmp/s50.tgz . && rm -rf "${OUT:?}"/* && mv /tmp/s50.tgz "$OUT/") && echo "packed after $SECONDS s"
