#!/usr/bin/env bash
# One device call for what the seventeenth session left (bench/results/kernels_h200_notes.md, "Next"): the split-KV
# decode attention's positions a program (at batch 1 the 8B step's attention is 64-position chunks, 3.9 us, plus a
# merge kernel, 1.8 us, for ~0.5 us of K/V bytes; never swept there), timed alone at batch 1 and 16 for fixed sizes
# beside the rule, then the compiled 8B W4 decode (lm_head quantized, batch 1, the defaults) with the rule and with
# each of CHUNKS (LLMCOMP_ATTN_CHUNK), each with --breakdown (the layer view shows the attention's two kernels).
# (The seventeenth session's own calls are recorded in bench/results/decode_h200_session17.log.)
#   bash bench/next_session.sh   (on the GPU machine; $OUT)   Knobs: ATTN_S, DECODE_S (seconds, 0 skips), CHUNKS.
set -u
. bench/session_common.sh
TAIL=12 run ${ATTN_S:-150} attn_chunks.log python3 bench/decode_attention_ab.py --batch 1,16 --stages 3 \
  --chunks 0,64,128,256,512 --separate-merge --out "$OUT/decode_attention_h200_chunks.json"
for c in 0 ${CHUNKS:-256}; do
  export LLMCOMP_ATTN_CHUNK=$([ "$c" = 0 ] || echo "$c")
  BATCH=1 FORMATS=uniform DECODE_S=${DECODE_S:-170} TAG=_chunk$c BUILD=0 bash bench/lmhead_session.sh 2>&1 \
    | grep -v "^real\|^user\|^sys"
done
