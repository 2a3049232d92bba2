#!/usr/bin/env bash
# Shared-segment decode on a CUDA machine, in one call of at most ~5 minutes:
#   1. tests/fast/test_shared.py compiled at realistic shapes (LAZYATTN_GPU_SUITE=1), over
#      8 pytest workers, and beside it the runner's compiled test of Engine(shared_decode_min_requests=2)
#      next to CUDA-graph replay (tests/serving/test_runner.py);
#   2. FlashInfer from wheels in .whl/ when they are there (for the cascade provider);
#   3. benchmarks/shared_decode.py (parity first, then CUDA-graph timing), given what is
#      left of the time budget (BUDGET seconds in all, default 285).
# Everything is written under $OUT (default ./.out): nvidia-smi.txt, env.txt,
# shared_tests.log, shared_junit.xml, shared_serving.log, shared_bench.log, shared.json.
# A short table is printed last. The package is used from the checkout (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-285}
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
source scripts/gpu_env.sh

timeout "${SERVING_TIMEOUT:-120}" $PY -m pytest tests/serving/test_runner.py -k shared_decode -q -p no:warnings \
    --durations=3 >"$OUT/shared_serving.log" 2>&1 &
serving_pid=$!
LAZYATTN_GPU_SUITE=1 timeout "${TEST_TIMEOUT:-130}" $PY -m pytest tests/fast/test_shared.py -q -p no:warnings \
    -n "${WORKERS:-8}" --durations=5 --junitxml="$OUT/shared_junit.xml" >"$OUT/shared_tests.log" 2>&1
tests_rc=$?
wait "$serving_pid"
serving_rc=$?
tests_s=$(($(date +%s) - START))
grep -E "^(FAILED|ERROR)|passed|failed|s call|Error" "$OUT/shared_tests.log" | tail -n 25
grep -E "^(FAILED|ERROR)|passed|failed|s call" "$OUT/shared_serving.log" | tail -n 8

source scripts/flashinfer_wheels.sh

left=$((BUDGET - ($(date +%s) - START)))
[ "$left" -lt 30 ] && left=30
bench_start=$(date +%s)
timeout "$left" $PY benchmarks/shared_decode.py --out "$OUT/shared.json" >"$OUT/shared_bench.log" 2>&1
bench_rc=$?
bench_s=$(($(date +%s) - bench_start))
if grep -q "^# shared-segment decode" "$OUT/shared_bench.log"; then
    sed -n '/^# shared-segment decode/,$p' "$OUT/shared_bench.log"
else  # cut short (FlashInfer's JIT compile, say): the rows it finished are in shared.json
    tail -n 30 "$OUT/shared_bench.log"
    [ -f "$OUT/shared.json" ] && $PY -c "
import json
from benchmarks.shared_decode import print_table
print_table(json.load(open('$OUT/shared.json')))"
fi
echo "shared_gpu: tests rc=$tests_rc, serving rc=$serving_rc (${tests_s}s), benchmark rc=$bench_rc (${bench_s}s)"
[ "$tests_rc" -eq 0 ] && [ "$serving_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
