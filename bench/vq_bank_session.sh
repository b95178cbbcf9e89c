#!/usr/bin/env bash
# One GPU call (first run 2026-11-30 on the branch kernel-vq-bank; results in kernels_h200_notes.md): build,
# the codebook CUDA tests (incl. the replicated table bit-equal to the single one), then the VQ rows with the
# bank-replicated table and with one table (LLMCOMP_VQ_REPLICATE=0), each beside the W4 and bf16 rows of its own run.
set -u
. bench/session_common.sh
timeout ${TEST_S:-120} python3 -m pytest -q tests/test_codebook_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -3
for rep in 1 0; do
  LLMCOMP_VQ_REPLICATE=$rep timeout ${BENCH_S:-170} python3 bench/bench_kernels.py --out "$OUT/kernels_vq_rep$rep.json" \
    --ms ${MS:-1,16,64} --bits 4 --float-formats vq2,vq3 2>&1 | grep -E "^(vq|W4)" | tee "$OUT/bench_rep$rep.log" | tail -30
done
