#!/usr/bin/env bash
# One device call: the codebook lookup-table GEMV (csrc/vq_lut.cu) — its CUDA tests (with the mma kernel's codebook
# tests and the traced forward; TESTS adds more, e.g. tests/test_kernels_cuda.py), A/B against the mma kernel at
# M = 1 (bench/vq_lut_ab.py), the grouped q / k / v and gate / up GEMV against each member's own kernel
# (bench/vq_group_ab.py), then decode on the 8B shape at batch 1 (compiled, 32 layers) for each of FORMATS.
#   bash bench/vq_lut_session.sh   (on the GPU machine; $OUT)   Knobs: TEST_S, AB_S, GROUP_S, DECODE_S (seconds, 0
#   skips), VARIANTS (bench/vq_lut_ab.py --variants), TAG (the JSONs' suffix; the default, _new, names no file the
#   README cites), DECODE_ENV (e.g. LLMCOMP_VQ_LUT_PRMT=1),
#   FORMATS (default vq2 vq3).
set -u
. bench/session_common.sh
TAIL=6 run ${TEST_S:-200} tests.log python3 -m pytest -q -x tests/test_codebook_cuda.py ${TESTS:-}
TAIL=14 run ${AB_S:-200} ab.log python3 bench/vq_lut_ab.py --variants "${VARIANTS:-auto,lut1024,prmt1024,mma}" \
  --out "$OUT/kernels_h200_vq_lut${TAG:-_new}.json"
TAIL=6 run ${GROUP_S:-150} group.log python3 bench/vq_group_ab.py --out "$OUT/kernels_h200_vq_group${TAG:-_new}.json"
for f in ${FORMATS:-vq2 vq3}; do
  TAIL=6 run ${DECODE_S:-240} decode_$f.log env ${DECODE_ENV:-LLMCOMP_PDL=0} python3 -m llmcomp bench decode \
    --synthetic llama3-8b --format $f --compile --context 512 --steps 64 --batch 1 \
    -o "$OUT/decode_h200_32layers_${f}_lut${TAG:-_new}_compiled.json"
done
