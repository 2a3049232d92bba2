#!/usr/bin/env bash
# The fast path's GPU suite, in one call on a CUDA machine (the lent H100 or H200):
#   1. the tests in tests/fast, compiled, at realistic shapes (LAZYATTN_GPU_SUITE=1:
#      head dim 128, thousands of tokens, batch 16+), spread over 16 pytest workers (each
#      may hold a few GiB of float64 oracle scores);
#   2. (unless SKIP_SERVING=1) the model runner's tests, which use the fast backend
#      compiled: CUDA graphs against eager, no host synchronisation inside a step,
#      shared-segment decode beside graph replay (SERVING_K: another -k expression);
#   3. (unless SKIP_BENCH=1) the kernel benchmark (benchmarks/kernels.py), which checks parity first, with
#      FlashInfer side by side when its wheels are in .whl/ (see benchmarks/kernels.py);
#   4. with SHARED_BENCH=1, the shared-segment decode benchmark (benchmarks/shared_decode.py);
#   5. with CHECK=1, `lazyattention check --backend fast` (CHECK_FUNCTIONS: a subset, in that
#      order) at the end; with CHECK=beside, beside the tests (it times nothing, and ends
#      before anything is timed);
#   6. with ENGINE_BENCH=NAME (e.g. engine_h200), the engine benchmark
#      (benchmarks/engine.py --name NAME, about 6 minutes on an H200: run it in a call
#      of its own, with SKIP_TESTS=1 to skip steps 1-3).
# Other scripts that follow the same pattern: scripts/quality_gpu.sh (the real-model study)
# and scripts/shared_gpu.sh (shared-segment decode).
# Everything is written under $OUT (default ./.out): nvidia-smi.txt, env.txt,
# tests.log, junit.xml, serving.log, serving.xml, bench.log, kernels.json. A short
# table is printed last.
# The package is used from the checkout through PYTHONPATH: nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
source scripts/gpu_env.sh

tests_rc=0 serving_rc=0 bench_rc=0 tests_s=0 serving_s=0 bench_s=0 check_rc=0

run_check() {
    local start
    start=$(date +%s)
    # shellcheck disable=SC2086
    timeout "${CHECK_TIMEOUT:-300}" $PY -m lazyattention.cli check --backend fast --device cuda \
        ${CHECK_FUNCTIONS:+--functions $CHECK_FUNCTIONS} >"$OUT/check.log" 2>&1
    echo "$? $(($(date +%s) - start))" >"$OUT/check.rc"
}
[ "${CHECK:-}" = beside ] && { run_check & check_pid=$!; }
if [ -z "${SKIP_TESTS:-}" ]; then
start=$(date +%s)
# tests/fast includes test_configurations.py: every function x head dim x dtype x key-load
# path, compiled once each (skipped without CUDA).
# SIGINT at the deadline: pytest then stops and still prints what passed and what failed.
# TEST_K: a -k expression, to run some of them.
LAZYATTN_GPU_SUITE=1 timeout -s INT -k 20 "${TEST_TIMEOUT:-360}" $PY -m pytest tests/fast ${TEST_K:+-k "$TEST_K"} -q -p no:warnings \
    -n "${WORKERS:-16}" --durations=5 -rfE --junitxml="$OUT/junit.xml" >"$OUT/tests.log" 2>&1
tests_rc=$?
tests_s=$(($(date +%s) - start))
grep -E "^(FAILED|ERROR)|passed|failed|s call" "$OUT/tests.log" | tail -n 30
fi
report_check() {
    read -r check_rc check_s <"$OUT/check.rc"
    grep -vE "examples, worst" "$OUT/check.log" | tail -n 15
    echo "lazyattention check rc=$check_rc (${check_s}s)"
}
# The check beside the tests ends before anything is timed.
[ "${CHECK:-}" = beside ] && { wait "$check_pid"; report_check; }

# FlashInfer, for the benchmarks' side-by-side providers: from wheels in .whl/ when the
# machine has no network (the benchmarks skip its providers, saying why, without it).
source scripts/flashinfer_wheels.sh

if [ -z "${SKIP_TESTS:-}" ]; then

if [ -z "${SKIP_SERVING:-}" ]; then
start=$(date +%s)
# The runner's tests run compiled. (The engine's fast-backend tests run Triton's interpreter
# on the CPU, in CI: it needs NumPy < 2.4, the project's pin, which a GPU image may not keep.)
timeout "${SERVING_TIMEOUT:-300}" $PY -m pytest tests/serving/test_runner.py -k "${SERVING_K:-runner}" \
    -q -p no:warnings --durations=5 --junitxml="$OUT/serving.xml" >"$OUT/serving.log" 2>&1
serving_rc=$?
serving_s=$(($(date +%s) - start))
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/serving.log" | tail -n 15
fi

if [ -z "${SKIP_BENCH:-}" ]; then
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-240}" $PY benchmarks/kernels.py --out "$OUT/kernels.json" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
bench_rc=$?
bench_s=$(($(date +%s) - start))
tail -n "${TAIL:-45}" "$OUT/bench.log"
fi
fi

shared_rc=0
if [ -n "${SHARED_BENCH:-}" ]; then
    start=$(date +%s)
    timeout "${SHARED_TIMEOUT:-200}" $PY benchmarks/shared_decode.py --out "$OUT/shared.json" >"$OUT/shared_bench.log" 2>&1
    shared_rc=$?
    sed -n '/^# shared-segment decode/,$p' "$OUT/shared_bench.log"
    grep -E "^flashinfer_cascade" "$OUT/shared_bench.log" | tail -c 1500
    echo "shared-segment benchmark rc=$shared_rc ($(($(date +%s) - start))s)"
fi

[ "${CHECK:-}" = 1 ] && { run_check; report_check; }

engine_rc=0
if [ -n "${ENGINE_BENCH:-}" ]; then
    start=$(date +%s)
    timeout "${ENGINE_TIMEOUT:-470}" $PY benchmarks/engine.py --name "$ENGINE_BENCH" --out "$OUT" \
        --max-seconds "${ENGINE_SECONDS:-380}" >"$OUT/engine.log" 2>&1
    engine_rc=$?
    grep -vE "^\s*$" "$OUT/engine.log" | tail -n 60
    echo "engine benchmark rc=$engine_rc ($(($(date +%s) - start))s)"
fi
echo "gpu_suite: tests rc=$tests_rc (${tests_s}s), serving rc=$serving_rc (${serving_s}s), benchmark rc=$bench_rc (${bench_s}s)"
[ "$tests_rc" -eq 0 ] && [ "$serving_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$check_rc" -eq 0 ] && [ "$shared_rc" -eq 0 ] \
    && [ "$engine_rc" -eq 0 ]
