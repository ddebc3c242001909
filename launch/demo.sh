#!/usr/bin/env bash
# make demo: pretrain a tiny GPT on the CPU with In-Run Data Shapley on, through the real entry point.
#  1. build the demo corpus from the local Python installation (three sources, 10% planted
#     corrupted documents) and tokenize it with a BPE trained here (no downloads);
#  2. torchrun launch/pretrain_gpt.py with configs/demo-cpu.yaml (gloo, tensor x pipeline parallel);
#  3. verify the dump (inrun-scores verify: files, rows, the efficiency identity on every step);
#  4. report the most helpful / harmful sequences, values per source and the corruption AUROC.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo
DATA=runs/demo-data
RUN=runs/demo
NPROC=${NPROC:-4}
start=$(date +%s)

rm -rf "$DATA" "$RUN"
mkdir -p "$DATA"
python -m inrun_megatron.data.demo_corpus --output "$DATA/corpus.jsonl"
python tools/preprocess_data.py --input "$DATA/corpus.jsonl" --output-dir "$DATA" --train-bpe 2048
torchrun --standalone --nproc_per_node "$NPROC" launch/pretrain_gpt.py --config configs/demo-cpu.yaml "$@"
inrun-scores verify "$RUN" --quiet  # every file and row, and sum of raw = <g_t, G_t> on every step
python tools/demo_report.py "$RUN"
echo "demo wall time: $(( $(date +%s) - start )) s"
