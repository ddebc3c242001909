#!/usr/bin/env bash
# One node, NPROC processes, started by torchrun (DeepSpeed adopts torchrun's process group).
#   launch/deepspeed_torchrun.sh NPROC CONFIG OUT [deepspeed_train.py options...]
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG OUT [options]}
CONFIG=${2:?deepspeed JSON config}
OUT=${3:?run directory}
shift 3
exec torchrun --standalone --nproc_per_node "$NPROC" \
    "$(dirname "$0")/deepspeed_train.py" --deepspeed_config "$CONFIG" --out "$OUT" "$@"
