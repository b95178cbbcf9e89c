#!/usr/bin/env bash
# One device call on the H100: uniform_cuda.is_h100's three picks against the H200 rule's, in one process each
# (bench_kernels.py --sweep --configs: the rule's pick and the alternative), at the M where they apply and beside.
#   bash bench/h100_rule_check_session.sh   (on the GPU machine; $OUT; ~3 min with a fresh build)
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
. bench/session_common.sh
sweep() { python3 bench/bench_kernels.py --sweep "$@" 2>&1 | grep sweep | cut -c1-150; }
sweep w4 --shapes 14336x4096 --ms 2,4,8 --configs 1.4.1,2.4.1 --out "$OUT/rule_w4_14336_h100.json"
sweep w3 --shapes 28672x8192 --ms 1,2 --configs 1.4.1,2.4.1 --out "$OUT/rule_w3_28672_h100.json"
sweep w2 --shapes 28672x8192 --ms 1,2,4 --configs 2.4.1,2.8.1 --out "$OUT/rule_w2_28672_h100.json"
sweep w3 --shapes 28672x8192 --ms 1 --configs 1.4.1,2.4.1 --fp16 --out "$OUT/rule_w3_28672_fp16_h100.json"
