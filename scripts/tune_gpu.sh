#!/usr/bin/env bash
# The kernel tuning sweep and the compiled attention tests, in one call on a CUDA machine:
#   1. benchmarks/tune_h200.py (split counts, tiles and kernel variants of the shapes where
#      the fast path lost; FlashInfer side by side when its wheels are in .whl/; with
#      BASELINE=DIR, also the kernels of DIR/basefast, another checkout's fast/ folder);
#   2. the attention tests in tests/fast/test_attention.py, compiled, at realistic shapes
#      (LAZYATTN_GPU_SUITE=1), on 16 pytest workers.
# The sweep starts no variant after TUNE_BUDGET seconds; the tests get what is left of
# DEADLINE seconds. Everything is written under $OUT (default ./.out): tune_h200.json,
# tune.log, tests.log, junit.xml, nvidia-smi.txt, env.txt. The tests' summary and the sweep's table
# are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
begin=$(date +%s)
source scripts/gpu_env.sh
source scripts/flashinfer_wheels.sh

start=$(date +%s)
timeout "${TUNE_TIMEOUT:-170}" $PY benchmarks/tune_h200.py --out "$OUT/tune_h200.json" --budget "${TUNE_BUDGET:-135}" \
    ${BASELINE:+--baseline "$BASELINE"} ${TUNE_ARGS:-} >"$OUT/tune.log" 2>&1
tune_rc=$?
tune_s=$(($(date +%s) - start))

# The tests get what is left of DEADLINE seconds (the whole call), at least 30.
start=$(date +%s)
left=$((${DEADLINE:-285} - (start - begin)))
LAZYATTN_GPU_SUITE=1 timeout "$((left > 30 ? left : 30))" $PY -m pytest ${TESTS:-tests/fast/test_attention.py} -q -p no:warnings -n 16 -rfE \
    --junitxml="$OUT/junit.xml" >"$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$(($(date +%s) - start))

grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/tests.log" | tail -n 12
grep -E "Error|Traceback" "$OUT/tune.log" | head -n 8
sed -n '/^# /,$p' "$OUT/tune.log"
echo "tune_gpu: sweep rc=$tune_rc (${tune_s}s), tests rc=$tests_rc (${tests_s}s)"
[ "$tune_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
