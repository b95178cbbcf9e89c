#!/usr/bin/env bash
# One GPU call, Triton only (no extension build): the decode-attention CUDA tests of this tree and of a variant tree
# (ALT, default .alt/unrolled: a copy of the branch attn-merge-unrolled made with `git archive`), then
# bench/decode_attention_ab.py run from the variant with this tree's module as the "old" version, the merge forced
# fused at every batch (twice).   bash bench/attn_merge_session.sh   (on the GPU machine)
set -u
BUILD=0 source "$(dirname "$0")/session_common.sh"
ALT=${ALT:-.alt/unrolled}
PYTHONPATH=$PWD run 150 attn_tests_main.log python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py
cp -r tests pyproject.toml "$ALT/"
(cd "$ALT" && PYTHONPATH=$PWD run 150 attn_tests_alt.log python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py)
cp llmcomp/kernels/decode_attention.py "$ALT/bench/_old_decode_attention.py"
export LLMCOMP_ATTN_FUSED_MERGE=1  # the variant's and the old module's merge fused at every batch
for i in 1 2; do
  PYTHONPATH=$PWD/$ALT TAIL=4 run 120 attn_ab_$i.log python3 "$ALT/bench/decode_attention_ab.py" --stages 3 \
    --separate-merge --out "$OUT/decode_attention_h200_unrolled_$i.json"
done
