#!/usr/bin/env bash
# GPU check, for a machine with one CUDA GPU and megatron-core (and DeepSpeed) importable:
#   1. the single-process exactness tests on the GPU: megatron-core unpatched (CUDA RNG tracker,
#      CUDA kernels, NCCL), fp32/fp64 scores and G against brute force, bf16/fp16 within their
#      rounding bounds, training equivalence, DeepSpeed ZeRO 0-3 on the GPU;
#   2. inrun-bench in bf16 at ~1.3B parameters (score GEMMs by default, in IEEE float32 and in
#      bf16, side by side) and at ~125M parameters.
# Usage: tools/gpu_check.sh [LOG_DIR]   (logs: LOG_DIR/tests.log, LOG_DIR/bench.log)
set -u
log_dir=${1:-runs/gpu-check}
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'

timeout 200 "$python" -m pytest -q -p no:cacheprovider -rfEP \
    tests/test_megatron_exact.py tests/test_megatron_precision.py tests/test_megatron_errors.py \
    tests/test_deepspeed.py tests/test_bench.py >"$log_dir/tests.log" 2>&1
echo "tests: exit $?"
grep -E "max relative error|rounding bound|passed|failed|error" "$log_dir/tests.log" | grep -v "^E " | sort | uniq | tail -80

bench() {
    echo "== inrun-bench $*" | tee -a "$log_dir/bench.log"
    timeout 100 "$python" -m inrun_megatron.bench "$@" 2>&1 | tee -a "$log_dir/bench.log" | grep -v Warning | tail -7
}
gpt_1_3b="--layers 24 --hidden 2048 --heads 16 --seq 2048 --vocab 50304 --micro-batch-size 2 --microbatches 8"
gpt_125m="--layers 12 --hidden 768 --heads 12 --seq 2048 --vocab 50304 --micro-batch-size 8 --microbatches 4"
bench $gpt_1_3b --dtype bfloat16 --steps 5
bench $gpt_1_3b --dtype bfloat16 --steps 5 --projection-dtype float32
bench $gpt_125m --dtype bfloat16 --steps 10
bench $gpt_1_3b --dtype bfloat16 --steps 5 --projection-dtype bfloat16
