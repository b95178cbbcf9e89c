#!/usr/bin/env bash
# One device call (forty-eighth session): M = 32 / 64, where the W4 kernel trails bf16 cuBLAS (0.84-0.88x on three
# shapes). (1) Launches with a row-group count that is not a power of two: on 28672 x 8192 the staged (2, 1, 8) pick
# runs 112 blocks on 132 SMs (one block an SM at 206 registers), (2, 1, 7) would run 128; (2) the table's rows at
# M = 32 / 64 with bf16 beside them; (3) Nsight Compute of the M = 64 kernels (never profiled before) with PC sampling.
#   bash bench/m64_session.sh   (on the GPU machine; $OUT)
set -u
. bench/session_common.sh
SW=${SWEEP_S:-200}
run $SW sweep_w4.log python3 bench/bench_kernels.py --sweep w4 --ms 32,64 --shapes 28672x8192 \
  --configs 2.1.8,2.1.7,1.1.8,1.1.7,2.2.4,2.2.3 --out "$OUT/sweep_w4_m64_wr.json"
run $SW sweep_w4b.log python3 bench/bench_kernels.py --sweep w4 --ms 32,64 --shapes 14336x4096,4096x4096 \
  --configs 2.2.2,2.1.7,1.1.7,2.1.4,2.4.1,2.8.1,2.16.1 --out "$OUT/sweep_w4b_m64_wr.json"
run $SW sweep_mxfp4.log python3 bench/bench_kernels.py --sweep mxfp4 --ms 64 --shapes 28672x8192 \
  --configs 2.8.1,2.1.8,2.1.7 --out "$OUT/sweep_mxfp4_m64_wr.json"
run ${TABLE_S:-150} table.log python3 bench/bench_kernels.py --shapes 28672x8192,14336x4096,4096x4096 --ms 32,64 \
  --bits 4 --float-formats "" --out "$OUT/kernels_m64.json"
[ "${NCU:-1}" = 0 ] || SHAPES=28672x8192,14336x4096,4096x4096 MS=64,32 FP16_SHAPES= SOURCE=uniform_mma_kernel \
  SOURCE_M=64 NCU_S=${NCU_S:-150} bash bench/ncu_session.sh 2>&1 | tail -40
