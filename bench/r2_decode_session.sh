#!/usr/bin/env bash
# One GPU call: build; the launch sweep of the very-many-row shapes at M = 1 and 4 (two row tiles a warp among the
# configurations; W4, and W2 on 28672 x 8192 at M = 1); then the 32-layer compiled decode as the CLI runs it, with
# its breakdown.   bash bench/r2_decode_session.sh   (on the GPU machine; knobs SWEEP_S, CLI_S; 0 skips)
set -u
source "$(dirname "$0")/session_common.sh"
TAIL=6 run "${SWEEP_S:-150}" sweep_r2_many_rows.log python3 -c "
import json, os
from llmcomp.eval import kernel_bench as kb
rows = kb.sweep(shapes=[(28672, 4096), (28672, 8192)], ms=(1, 4))
json.dump(rows, open(os.environ['OUT'] + '/kernels_sweep_h200_r2_many_rows.json', 'w'), indent=0)
rows = kb.sweep(shapes=[(28672, 8192)], ms=(1,), bits=2)
json.dump(rows, open(os.environ['OUT'] + '/kernels_sweep_h200_r2_w2.json', 'w'), indent=0)"
TAIL=30 run "${CLI_S:-330}" decode_cli.log python3 -m llmcomp bench decode --synthetic llama3-8b --compile --breakdown \
  --out "$OUT/decode_h200_32layers_compiled_r2.json"
