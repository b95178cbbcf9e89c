set -u
source bench/session_common.sh
TAIL=10 run 100 ab_probe.log env LLMCOMP_MMA_STREAM_PROBE=1 python3 bench/kernel_ab.py --knob stream --variants 0,8 --ms 1 --out "$OUT/kernels_h200_stream_probe.json"
TAIL=10 run 100 ab_ns12.log env LLMCOMP_MMA_STREAM_STAGES=12 python3 bench/kernel_ab.py --knob stream --variants 0,8 --ms 1 --out "$OUT/kernels_h200_stream_ns12.json"
LLMCOMP_MMA_STREAM=8 NCU_S=150 SHAPES=14336x4096,28672x8192 MS=1 FP16_SHAPES= bash bench/ncu_session.sh 2>&1 | tail -30
