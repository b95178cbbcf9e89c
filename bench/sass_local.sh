#!/usr/bin/env bash
# Registers and SASS of the mma kernels without a GPU: compile one translation unit with the local nvcc for sm_90
# and disassemble it with cuobjdump + nvdisasm from NVIDIA's pip wheels (fetched once into $SASS_TOOLS).
#   bash bench/sass_local.sh mma_int4 'uniform_mma_kernelI13__nv_bfloat16Li4ELi1ELi1E'
# prints ptxas' registers/spills for every kernel of the unit, then the instruction histogram of the kernels whose
# mangled name matches the pattern (the listing is left in $OUT_DIR/fn.lst); NVCC_EXTRA adds nvcc flags (e.g. -DNAME=1).
# Needs nvcc (CUDA 12.4+) and torch.
set -eu
TU=${1:?translation unit, e.g. mma_int4}; PAT=${2:-uniform_mma_kernel}
SASS_TOOLS=${SASS_TOOLS:-$HOME/.cache/llmcomp/sass-tools}; OUT_DIR=${OUT_DIR:-/tmp/llmcomp-sass}
mkdir -p "$SASS_TOOLS" "$OUT_DIR/stub/c10/cuda/impl"
if [ ! -x "$SASS_TOOLS/bin/nvdisasm" ]; then
  pip download -q --no-deps -d "$SASS_TOOLS/whl" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
  for w in "$SASS_TOOLS"/whl/*.whl; do python3 -m zipfile -e "$w" "$SASS_TOOLS/x"; done
  mkdir -p "$SASS_TOOLS/bin"; cp $(find "$SASS_TOOLS/x" -path '*/bin/*' -type f) "$SASS_TOOLS/bin/"; chmod +x "$SASS_TOOLS"/bin/*
fi
# The CPU build of torch lacks this generated header; the kernels need none of its macros.
[ -f "$OUT_DIR/stub/c10/cuda/impl/cuda_cmake_macros.h" ] || echo '#pragma once' > "$OUT_DIR/stub/c10/cuda/impl/cuda_cmake_macros.h"
TI=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
PI=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
SRC=${CSRC_DIR:-$(dirname "$0")/../llmcomp/kernels/csrc}/$TU.cu  # CSRC_DIR: an edited copy (mma_probe.use)
nvcc -c -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -I"$OUT_DIR/stub" $TI -I"$PI" -DTORCH_EXTENSION_NAME=x ${NVCC_EXTRA:-} \
  "$SRC" -o "$OUT_DIR/$TU.o" -Xptxas -v 2>&1 | grep -E "Compiling entry|Used|spill" | paste - - - |
  sed -E 's/.*function .(_Z[^ ]*). for .sm_90.*( [0-9]+ bytes spill stores).*Used ([0-9]+) registers.*/\3 regs\2  \1/' |
  c++filt | cut -c1-160
PATH="$SASS_TOOLS/bin:$PATH" "$SASS_TOOLS/bin/cuobjdump" -sass "$OUT_DIR/$TU.o" > "$OUT_DIR/all.sass"
awk -v pat="$PAT" '/Function :/{f=($0 ~ pat)} f' "$OUT_DIR/all.sass" | grep -oE "/\*[0-9a-f]{4}\*/\s+[^;]*;" > "$OUT_DIR/fn.lst" || true
echo "instructions matching '$PAT': $(wc -l < "$OUT_DIR/fn.lst")"
awk '{i=2; if ($2 ~ /^@/) i=3; split($i,a,"."); print a[1]}' "$OUT_DIR/fn.lst" | sort | uniq -c | sort -rn | head -20 | tr '\n' ' '; echo
