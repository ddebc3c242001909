#!/usr/bin/env bash
# One node, NPROC processes, started by DeepSpeed's launcher.
#   launch/deepspeed_single_node.sh NPROC CONFIG OUT [deepspeed_train.py options...]
# On a CPU-only machine export DS_ACCELERATOR=cpu (NPROC processes are then CPU ranks).
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG OUT [options]}
CONFIG=${2:?deepspeed JSON config}
OUT=${3:?run directory}
shift 3
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    "$(dirname "$0")/deepspeed_train.py" --deepspeed_config "$CONFIG" --out "$OUT" "$@"
