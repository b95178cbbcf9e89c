#!/usr/bin/env bash
# One device call (prepared in the forty-second session, run in the forty-third: prefill_chunks_*_h200_s43.json): the
# prefill layer above M = 64 in row pieces, in order and with the next piece's dequantize on a second stream
# (bench/prefill_chunks.py), W4 then MXFP4, M = 256 and 1024; then the dequantize A/B rows the forty-second session
# did not reach.
#   bash bench/prefill_session.sh   (on the GPU machine; $OUT)   Knobs: CHUNK_S, AB_S (seconds; 0 skips each)
set -u
. bench/session_common.sh
for f in w4 mxfp4; do
  step ${CHUNK_S:-150} python3 bench/prefill_chunks.py --format $f --ms 256,1024 --out "$OUT/prefill_chunks_$f.json"
done
step ${AB_S:-120} python3 bench/dequant_ab.py --formats w2,mxfp4,nvfp4 --shapes 4096x4096,14336x4096 \
  --out "$OUT/dequant_stage_rest.json"
grep -E "best|plain_a" "$OUT/session.log"
