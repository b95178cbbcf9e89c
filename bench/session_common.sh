# Sourced by the GPU session scripts (bench/*_session.sh): environment (carried wheels in .whl installed), $OUT, the
# extension built and reported (not with BUILD=0: Triton-only sessions), and
# run SECONDS LOG CMD... (time-limited, logged under $OUT, skipped at 0 seconds; TAIL lines of the log shown), step.
export PYTHONUNBUFFERED=1 LLMCOMP_TRITON_AUTOTUNE=0 PYTHONPATH=$PWD
if [ -d .whl ]; then  # wheels carried to the GPU machine (e.g. bitsandbytes for the peer column)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
  PYTHONPATH=$PWD:/tmp/site
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ "${BUILD:-1}" = 0 ] || ( time python3 -c "import torch; torch.zeros(1).cuda(); from llmcomp.kernels import uniform_cuda; print('ext', uniform_cuda.extension() is not None, 'pdl', uniform_cuda.dependent_launch())" ) 2>&1 | tail -4
run() {
  local s=$1 log=$2; shift 2
  [ "$s" = 0 ] && return
  ( time timeout "$s" "$@" ) > "$OUT/$log" 2>&1; echo "$log rc $?"; tail -${TAIL:-8} "$OUT/$log"
}
# step SECONDS CMD...: CMD time-limited, appended to $OUT/session.log; one summary line shown (one log for many
# steps: a call returns at most 8 files).
step() {
  local s=$1; shift
  [ "$s" = 0 ] && return
  echo "== $*" >> "$OUT/session.log"
  timeout "$s" "$@" >> "$OUT/session.log" 2>&1; echo "rc $? after $SECONDS s: $*" | cut -c1-150
}
# build_ext: the extension built (or found in the cache) for the tree on PYTHONPATH, reported as "ext True|False".
build_ext() {
  python3 -c "from llmcomp.kernels import uniform_cuda; print('ext', uniform_cuda.extension() is not None)"
}
# build_beside VARIANT...: the extension and bench/mma_probe.py's probe builds in parallel (BUILD=0 callers; logs
# build.log and build_VARIANT.log under $OUT, their last lines shown). A build cut by PROBE_BUILD_S leaves torch's
# lock file in its build directory, and that variant's timing then waits until its own limit.
build_beside() {
  ( time ( build_ext > "$OUT/build.log" 2>&1 &
           for v in "$@"; do
             timeout ${PROBE_BUILD_S:-300} python3 bench/mma_probe.py build "$v" > "$OUT/build_$v.log" 2>&1 &
           done
           wait ) ) 2>&1 | tail -3
  tail -n 2 "$OUT"/build*.log
}
