#!/usr/bin/env bash
# NPROC processes started by mpirun (Open MPI); ranks, local ranks and the rendezvous come from
# MPI through mpi4py (inrun_megatron.distributed): loopback on one host, MASTER_ADDR across hosts.
#   launch/deepspeed_mpirun.sh NPROC CONFIG OUT [deepspeed_train.py options...]
# Extra mpirun options (e.g. --hostfile, --oversubscribe, --allow-run-as-root) go in MPIRUN_ARGS.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG OUT [options]}
CONFIG=${2:?deepspeed JSON config}
OUT=${3:?run directory}
shift 3
EXPORTS=()  # forward the environment the ranks need, where it is set
for v in PATH PYTHONPATH DS_ACCELERATOR INRUN_CPU_FP16 OMP_NUM_THREADS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME MASTER_ADDR MASTER_PORT; do
    if [[ -n "${!v:-}" ]]; then EXPORTS+=(-x "$v"); fi
done
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun -np "$NPROC" ${MPIRUN_ARGS:-} "${EXPORTS[@]}" \
    python "$(dirname "$0")/deepspeed_train.py" --deepspeed_config "$CONFIG" --out "$OUT" "$@"
