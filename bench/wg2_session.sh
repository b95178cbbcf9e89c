#!/usr/bin/env bash
# One device call, after bench/wgmma_session.sh: the warpgroup kernel with its weights loaded a round ahead — CUDA tests
# (the warpgroup test on every format, and the mma.sync regression set), then W4 bf16 timings on the shapes with many
# rows: the mma.sync kernel at launch_config's pick, the warpgroup kernel at three launches, and the wg_w0 probe (no
# kblock of wgmma in flight while the next decodes) built beside it.   bash bench/wg2_session.sh   (GPU machine; $OUT)
# Knobs: TEST_S, TIME_S (seconds, 0 skips), SHAPES, MS.
set -u
BUILD=0 . bench/session_common.sh
build_beside wg_w0
TAIL=4 run ${TEST_S:-220} tests.log python3 -m pytest -q tests/test_kernels_cuda.py \
  -k "wgmma or every_launch or every_m or post_scale"
S=${SHAPES:-28672x8192,14336x4096,28672x4096}; MSV=${MS:-16,64}
TAIL=40 run ${TIME_S:-200} time.log bash -c "
  python3 bench/mma_probe.py time base --shapes $S --ms $MSV --out $OUT/wg2_mma.json
  for l in 2,2,4 2,1,8 1,4,4; do
    LLMCOMP_MMA_WGMMA=1 python3 bench/mma_probe.py time base --shapes $S --ms $MSV --launch \$l --out $OUT/wg2_wg_\$l.json
  done
  LLMCOMP_MMA_WGMMA=1 python3 bench/mma_probe.py time wg_w0 --shapes $S --ms $MSV --launch 2,2,4"
