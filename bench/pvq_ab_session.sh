#!/usr/bin/env bash
# One device call (thirty-fifth session): A/B of a PVQ kernel change given as a patch (PATCH, default
# alt_early.patch) against this tree, in one machine: both extensions built in parallel (a copy of the tree in
# /tmp/alt with the patch applied), then pvq3 (dense escapes) at M = 1 / 8 / 16 and pvq2 at M = 1 through the launch
# rule, this tree first, the patched one second, this tree again (AGAIN_S), then the patched tree's PVQ CUDA tests.
#   PATCH=alt_early.patch bash bench/pvq_ab_session.sh   (on the GPU machine; $OUT)
#   Knobs: PVQ3_S, PVQ2_S, AGAIN_S, TESTS_S (seconds, 0 skips).
set -u
BUILD=0 . bench/session_common.sh
rm -rf /tmp/alt && mkdir /tmp/alt && cp -r . /tmp/alt && (cd /tmp/alt && patch -p1 < "${PATCH:-alt_early.patch}") \
  || { echo "patch failed"; exit 1; }
build() { (cd "$1" && PYTHONPATH=$1 python3 -c "from llmcomp.kernels import uniform_cuda as u; print('ext', u.extension() is not None)"); }
( time ( build "$PWD" > "$OUT/build_main.log" 2>&1 & build /tmp/alt > "$OUT/build_alt.log" 2>&1 & wait ) ) 2>&1 | tail -3
tail -n 1 "$OUT"/build_*.log
time_tree() {  # DIR TAG
  (cd "$1" && PYTHONPATH=$1 TAIL=10 run ${PVQ3_S:-60} "pvq3_$2.log" python3 bench/pvq_launch.py --format pvq3 \
    --out "$OUT/pvq3_$2.json" --ms 1,8,16 --launches 0x0x0 --shapes 4096x4096,14336x4096,4096x14336)
  (cd "$1" && PYTHONPATH=$1 TAIL=5 run ${PVQ2_S:-60} "pvq2_$2.log" python3 bench/pvq_launch.py --format pvq2 \
    --out "$OUT/pvq2_$2.json" --ms 1 --launches 0x0x0 --shapes 4096x4096,14336x4096,4096x14336,28672x8192)
}
time_tree "$PWD" main
time_tree /tmp/alt alt
[ "${AGAIN_S:-1}" = 0 ] || time_tree "$PWD" main2
(cd /tmp/alt && PYTHONPATH=/tmp/alt TAIL=6 run ${TESTS_S:-90} pvq_tests_alt.log python3 -m pytest -q -m cuda \
  tests/test_pyramid_kernel.py)
