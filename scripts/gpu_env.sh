# Sourced by the GPU scripts (gpu_suite.sh, shared_gpu.sh, tune_gpu.sh) from the
# repository root: where results go ($OUT, default ./.out), which Python ($PY, from
# $PYTHON, default python3), the package from the checkout on PYTHONPATH (nothing is
# installed), unbuffered output; and a record of the machine under $OUT: nvidia-smi.txt,
# and env.txt (torch, Triton and the device, also printed).
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name())' \
    | tee "$OUT/env.txt"
