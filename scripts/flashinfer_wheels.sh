# Sourced by the GPU scripts (gpu_suite.sh, shared_gpu.sh, tune_gpu.sh) from the
# repository root, with PY and OUT set: FlashInfer from wheels in .whl/ when they are
# there (the GPU machine has no network), installed into /tmp/site and put on PYTHONPATH,
# the install's log in $OUT/flashinfer_install.log. Without wheels it does nothing, and
# the benchmarks skip FlashInfer's providers, saying why.
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/flashinfer_install.log" 2>&1 && export PYTHONPATH=$PYTHONPATH:/tmp/site
    export FLASHINFER_WORKSPACE_BASE=/tmp/fiws FLASHINFER_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export MAX_JOBS=${MAX_JOBS:-14}
fi
