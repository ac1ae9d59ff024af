#!/usr/bin/env bash
# Two ranks on one machine: Fabric launches the second process itself. Each rank calibrates half
# of the batches; Hessian sums are reduced to the rank that solves them; every rank ends with the
# same quantized weights and rank 0 writes the checkpoint.
#   bash examples/two_ranks.sh MODEL_DIR TEXT_FILE OUTPUT_DIR [extra overrides...]
set -euo pipefail
model=${1:?model folder}; text=${2:?calibration text file}; out=${3:?output directory}; shift 3
# One thread per rank: on a CPU the ranks share the cores.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m fabricq +recipe=gptq_w4 trainer.devices=2 \
    model.path="$model" data.path="$text" output_dir="$out" "$@"
