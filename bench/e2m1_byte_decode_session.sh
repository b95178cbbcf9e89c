#!/usr/bin/env bash
# One device call (forty-first session): the E2M1 CUDA tests, then the 8B MXFP4 decode with byte block scales and
# without (LLMCOMP_E2M1_BYTE_SCALES=0), and NVFP4 with them (bench/lmhead_session.sh; $OUT).
set -u
. bench/session_common.sh
TAIL=3 run 200 e2m1_tests2.log python3 -m pytest -q -rf -m cuda tests/test_kernels_cuda.py -k "e2m1 or glu"
for f in "mxfp4 1" "mxfp4 0" "nvfp4 1"; do
  set -- $f
  LLMCOMP_E2M1_BYTE_SCALES=$2 FORMATS=$1 TAG=_bytes$2 DECODE_S=140 BUILD=0 bash bench/lmhead_session.sh 2>&1 | grep -E "llama3|rc" | tail -3
done
