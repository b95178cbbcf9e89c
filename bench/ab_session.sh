#!/usr/bin/env bash
# One device call: A/B of a change given as a patch against this tree, on one machine. A copy of the tree in /tmp/alt
# gets the patch; both extensions are built in parallel; then BENCH runs in this tree (TAG=main), the patched one
# (TAG=alt) and this tree again (TAG=main2, unless AGAIN=0), each cut at BENCH_S seconds; then pytest TESTS in the
# patched tree (TESTS_S). Everything under $OUT is also packed into $OUT/ab.tar at the end (a call returns at most
# 8 files). Written for the thirty-fifth session (the PVQ escape-early A/B ran as its first form, pvq_ab_session.sh
# in the history: ffa502d).
#   PATCH=alt.patch BENCH='python3 bench/kernel_ab.py ... --out $OUT/x_$TAG.json' TESTS='-m cuda tests/...' \
#     bash bench/ab_session.sh        (on the GPU machine; $OUT)
set -u
BUILD=0 . bench/session_common.sh
trap 'tar -C "$OUT" -cf /tmp/ab.tar --exclude ab.tar . && mv /tmp/ab.tar "$OUT/ab.tar"' EXIT
rm -rf /tmp/alt && mkdir /tmp/alt && cp -r . /tmp/alt && (cd /tmp/alt && patch -p1 < "${PATCH:?patch file}") \
  || { echo "patch failed"; exit 1; }
build() { (cd "$1" && PYTHONPATH=$1 build_ext); }
( time ( build "$PWD" > "$OUT/build_main.log" 2>&1 & build /tmp/alt > "$OUT/build_alt.log" 2>&1 & wait ) ) 2>&1 | tail -3
tail -n 1 "$OUT"/build_*.log
bench_in() {  # DIR TAG
  (cd "$1" && export PYTHONPATH=$1 TAG=$2 && TAIL=${BENCH_TAIL:-8} run ${BENCH_S:-90} "bench_$2.log" bash -c "$BENCH")
}
bench_in "$PWD" main
bench_in /tmp/alt alt
[ "${AGAIN:-1}" = 0 ] || bench_in "$PWD" main2
# TESTS through bash -c, so that quoted arguments (-k "a or b") stay whole (the first E2M1 call split them: rc 4)
[ -z "${TESTS:-}" ] || (cd /tmp/alt && PYTHONPATH=/tmp/alt TAIL=4 run ${TESTS_S:-90} tests_alt.log \
  bash -c "python3 -m pytest -q $TESTS")
