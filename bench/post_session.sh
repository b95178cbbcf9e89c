#!/usr/bin/env bash
# One GPU call: build; CUDA tests (post-scale, stacked/frozen linears, decode attention and bench); the post-scale
# A/B on the W4 GEMMs and an 8B layer's linears (bench/kernel_ab.py --knob post); the launch sweep of the stacked q/k/v
# and gate/up shapes; the decode A/B (bench/decode_ab.py, AB_ARGS).
#   bash bench/post_session.sh   (on the GPU machine; knobs: TEST_S, TEST_K, AB4_S, SWEEP_S, DEC_S, AB_ARGS; 0 skips)
# (As first run, 2026-12-01, it also timed two variants of the post-scale kernel that took the zero by extra mma —
# slower, removed: bench/results/kernels_h200_notes.md.)
set -u
source "$(dirname "$0")/session_common.sh"
run "${TEST_S:-150}" cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
  tests/test_decode_bench.py tests/test_kernels_cuda.py -k "${TEST_K:-post_scale or frozen or fuse or stack or decode}"
TAIL=30 run "${AB4_S:-200}" kernel_ab_post.log python3 bench/kernel_ab.py --knob post --ms 1,4 --out "$OUT/kernels_h200_post.json"
TAIL=12 run "${SWEEP_S:-120}" sweep_stacked.log python3 -c "import json, os; from llmcomp.eval import kernel_bench as kb
json.dump(kb.sweep(shapes=[(6144, 4096), (28672, 4096)], ms=(1, 16)), open(os.environ['OUT'] + '/kernels_sweep_h200_stacked.json', 'w'), indent=0)"
TAIL=20 run "${DEC_S:-0}" decode_ab.log python3 bench/decode_ab.py --out "$OUT/decode_h200_ab_inductor_pdl.json" ${AB_ARGS:-}
