#!/usr/bin/env bash
# Several nodes, started by DeepSpeed's launcher over ssh (pdsh) from a hostfile
# ("<host> slots=<processes>" per line, see launch/deepspeed_hostfile.example). Run on the first host;
# every host needs the same checkout and environment at the same path.
#   launch/deepspeed_multi_node.sh HOSTFILE CONFIG OUT [deepspeed_train.py options...]
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE CONFIG OUT [options]}
CONFIG=${2:?deepspeed JSON config}
OUT=${3:?run directory, on storage every host can write}
shift 3
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    "$(dirname "$0")/deepspeed_train.py" --deepspeed_config "$CONFIG" --out "$OUT" "$@"
