#!/usr/bin/env bash
# One device call: the 8B-shaped compiled decode with lm_head quantized too (--quantize-lm-head), W4 g128 (no
# environment, as its cited runs) and vq2 (LLMCOMP_PDL=0, as its cited runs), each with its breakdown, at each
# --layers-per-graph of SPANS (consecutive decoder layers compiled as one graph).
#   bash bench/lmhead_session.sh   (on the GPU machine; $OUT)   Knobs: DECODE_S (seconds, 0 skips), FORMATS, BATCH,
#   SPANS (default 1; e.g. "1 32"), TAG (the JSONs' suffix; a span other than 1 adds _span<N>), EXTRA (more
#   arguments of bench decode, e.g. "--inductor-option combo_kernels=true"; name them in TAG).
set -u
. bench/session_common.sh
for f in ${FORMATS:-uniform vq2}; do
  for span in ${SPANS:-1}; do
    env=LLMCOMP_NOTHING=; [ "$f" = uniform ] || env=LLMCOMP_PDL=0
    tag=${TAG:-}; [ "$span" = 1 ] || tag=${tag}_span$span
    TAIL=8 run ${DECODE_S:-240} decode_$f$tag.log env $env python3 -m llmcomp bench decode --synthetic llama3-8b \
      --format $f --compile --context 512 --steps 64 --batch ${BATCH:-1} --quantize-lm-head --breakdown \
      --layers-per-graph $span ${EXTRA:-} -o "$OUT/decode_h200_32layers_${f}_lmhead${tag}_compiled.json"
  done
done
