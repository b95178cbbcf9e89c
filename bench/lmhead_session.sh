#!/usr/bin/env bash
# One device call: the 8B-shaped compiled decode at batch 1 with lm_head quantized too (--quantize-lm-head), W4 g128
# (no environment, as its cited runs) and vq2 (LLMCOMP_PDL=0, as its cited runs), each with its breakdown.
#   bash bench/lmhead_session.sh   (on the GPU machine; $OUT)   Knobs: DECODE_S (seconds, 0 skips), FORMATS, BATCH,
#   TAG (the JSONs' suffix).
set -u
. bench/session_common.sh
for f in ${FORMATS:-uniform vq2}; do
  env=LLMCOMP_NOTHING=; [ "$f" = uniform ] || env=LLMCOMP_PDL=0
  TAIL=8 run ${DECODE_S:-240} decode_$f.log env $env python3 -m llmcomp bench decode --synthetic llama3-8b \
    --format $f --compile --context 512 --steps 64 --batch ${BATCH:-1} --quantize-lm-head --breakdown \
    -o "$OUT/decode_h200_32layers_${f}_lmhead${TAG:-}_compiled.json"
done
