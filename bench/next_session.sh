#!/usr/bin/env bash
# The compiled 8B W4 decode (lm_head quantized, batch 1) under each setting of SETTINGS in turn, RUNS rounds from one
# build — the test a kernel change must pass (the twenty-fourth session: reduced forms of a loop 1-10 % faster alone
# were 2-4 % slower in the decode graph). A setting is NAME=VALUE[,NAME=VALUE...] of environment variables ("-" for
# none); its JSON tag is _<round>_<setting, any character but letters, digits, . and _ as -> ("default" for -).
# CUDA tests first if TESTS (a pytest -k expression).
# About 2 min a run.
#   SETTINGS="LLMCOMP_MMA_XSTAGE=1 LLMCOMP_MMA_XSTAGE=0" bash bench/next_session.sh   (on the GPU machine; $OUT)
# Knobs: SETTINGS, RUNS (default "a b"), TESTS, TEST_S, DECODE_S (seconds, 0 skips), BATCH (default 1)
set -u
. bench/session_common.sh
[ -n "${TESTS:-}" ] && TAIL=3 run ${TEST_S:-300} cuda_tests.log python3 -m pytest -q -rf -m cuda tests -k "$TESTS"
for r in ${RUNS-a b}; do
  for setting in ${SETTINGS:--}; do
    envs=(); tag=default
    if [ "$setting" != - ]; then
      IFS=, read -ra envs <<< "$setting"; tag=$(echo "$setting" | tr -c "A-Za-z0-9._\n" "-")
    fi
    env "${envs[@]}" BATCH=${BATCH:-1} FORMATS=uniform DECODE_S=${DECODE_S:-200} TAG=_${r}_${tag}_b${BATCH:-1} BUILD=0 \
      bash bench/lmhead_session.sh 2>&1 | grep -v "^real\|^user\|^sys" | tail -4
  done
done
