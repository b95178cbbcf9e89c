#!/usr/bin/env bash
# The README's main job: quantize the bundled SmolLM2-135M-Instruct at 8, 4 and 3 bits with RTN,
# then print perplexity / bits per weight / size against the original in one table.
set -euo pipefail
out=${1:-out}
llmcomp quantize --bits 8 --group-size 0 --sym -o "$out/w8"       --overwrite
llmcomp quantize --bits 4 --group-size 128     -o "$out/w4g128"   --overwrite
llmcomp quantize --bits 4 --group-size 0       -o "$out/w4"       --overwrite
llmcomp quantize --bits 3 --group-size 128     -o "$out/w3g128"   --overwrite
llmcomp eval smollm2-135m "$out/w8" "$out/w4g128" "$out/w4" "$out/w3g128" --compare --json "$out/quickstart.json"
