#!/usr/bin/env bash
# One device call on the H100 the targets are stated for (every session since the second ran on an H200):
# the extension built, then, each step cut to what is left of DEADLINE seconds (default 560), in order:
# (1) the full W4 table with the peers (bf16 cuBLAS, tinygemm, bitsandbytes NF4 where .whl carries it) and MXFP4 /
#     NVFP4 at M = 1, 4, 16, 64; (2) W3 / W2 and the codebook formats at M = 1; (3) the compiled 8B-shaped decode at
#     batch 1 (W4, lm_head quantized), the decode target.
#   bash bench/h100_session.sh   (on the GPU machine; $OUT)   Knobs: TABLE=0 / LOW=0 / DECODE=0 skip a step (the
#   decode also when under 150 s are left); BATCHES=1,16 the decode's batch sizes (default 1).
set -u
T0=$SECONDS; DEADLINE=${DEADLINE:-560}
left() { local l=$((DEADLINE - (SECONDS - T0))); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 0 ? l : 0)); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
. bench/session_common.sh
python3 -c "import bitsandbytes as b; print('bitsandbytes', b.__version__)" 2>&1 | tail -1
[ "${TABLE:-1}" = 0 ] || TAIL=40 run "$(left 260)" table.log python3 bench/bench_kernels.py \
  --out "$OUT/kernels_h100.json" --ms 1,4,16,64 --bits 4 --float-formats mxfp4,nvfp4
[ "${LOW:-1}" = 0 ] || TAIL=12 run "$(left 90)" lowbit.log python3 bench/bench_kernels.py \
  --out "$OUT/kernels_lowbit_h100.json" --ms 1 --bits 3,2 --float-formats vq2,vq3
[ "${DECODE:-1}" = 0 ] || [ "$(left 200)" -lt 150 ] || TAIL=8 run "$(left 200)" decode.log \
  python3 -m llmcomp bench decode --synthetic llama3-8b --format uniform --compile --context 512 --steps 64 \
  --batch "${BATCHES:-1}" --quantize-lm-head -o "$OUT/decode_h100_32layers_uniform_lmhead_compiled.json"
