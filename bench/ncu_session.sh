#!/usr/bin/env bash
# One device call: Nsight Compute profile of the mma dequant-GEMM (and cuBLAS bf16 beside it) + the SASS of the
# extension, under $OUT.  bash bench/ncu_session.sh   (on the GPU machine)
# Knobs (env): SHAPES (N x K list, default 4096x4096,28672x8192), MS (default 1,16), NCU_S (time limit, 240),
# FP16_SHAPES (also profile fp16 activations at M=1 on these; empty: skip), FORMAT (uniform, vq2, vq3: the codebook
# kernel on random indices), BITS (uniform's bits, default 4), COPIES (vq: 16 = the bank-replicated table, 1 = one
# table, 0 = the default path: the lookup-table GEMV at M = 1 on weights of >= 4096 x 4096), SOURCE and SOURCE_M
# (below).
# Reading the output: bench/results/kernels_h200_notes.md (third session) — issue rate, DRAM %, instructions.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SO=$(python3 -c "from llmcomp.kernels import uniform_cuda; print(uniform_cuda.extension().__file__)" 2>/dev/null | tail -1)
[ -n "$SO" ] && cuobjdump -sass "$SO" | gzip > "$OUT/sass.txt.gz"
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats
   --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"
timeout ${NCU_S:-240} ncu --profile-from-start off --clock-control none $S python3 bench/ncu_kernel.py \
  --shapes "${SHAPES:-4096x4096,28672x8192}" --ms "${MS:-1,16}" --format "${FORMAT:-uniform}" --copies "${COPIES:-16}" \
  --bits "${BITS:-4}" > "$OUT/ncu_bf16.txt" 2>&1; echo "ncu rc $?"
if [ -n "${FP16_SHAPES-28672x8192}" ]; then
  timeout ${NCU_S:-240} ncu --profile-from-start off --clock-control none $S python3 bench/ncu_kernel.py \
    --shapes "${FP16_SHAPES-28672x8192}" --ms 1 --fp16 --no-bf16 --bits "${BITS:-4}" > "$OUT/ncu_fp16.txt" 2>&1
  echo "ncu fp16 rc $?"
fi
grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput|Issued Ipc Active|Issued Instructions  |Registers Per|Achieved Occupancy" \
  "$OUT/ncu_bf16.txt" | cut -c1-140
# SOURCE=<kernel name regex>: one launch of it (the first shape, M = SOURCE_M, default 1) profiled with PC sampling,
# and its SASS with the per-instruction stall samples as CSV (ncu_source_sass.csv) — which loads the warps wait on.
# W4 at M = 16 on 28672 x 8192 (its (2, 2, 2) two-tile kernel; notes, forty-third session's Next):
#   SHAPES=28672x8192 MS=4,16 FP16_SHAPES= SOURCE=uniform_mma_kernel SOURCE_M=16 bash bench/ncu_session.sh
if [ -n "${SOURCE:-}" ]; then
  timeout ${NCU_S:-240} ncu --profile-from-start off --clock-control none --section SourceCounters \
    --section WarpStateStats -k "regex:${SOURCE}" -c 1 -f -o "$OUT/source" python3 bench/ncu_kernel.py \
    --shapes "$(s=${SHAPES:-4096x4096,28672x8192}; echo "${s%%,*}")" --ms "${SOURCE_M:-1}" \
    --format "${FORMAT:-uniform}" --copies "${COPIES:-16}" --bits "${BITS:-4}" > "$OUT/ncu_source.log" 2>&1
  echo "ncu source rc $?"
  ncu -i "$OUT/source.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_source_sass.csv" 2>&1
  echo "source csv rc $? lines $(wc -l < "$OUT/ncu_source_sass.csv")"; head -c 600 "$OUT/ncu_source_sass.csv"; rm -f "$OUT/source.ncu-rep"
fi
