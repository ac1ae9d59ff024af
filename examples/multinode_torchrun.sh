#!/usr/bin/env bash
# Several machines with torchrun: run this on every node with the same HEAD address.
#   NNODES=2 NODE_RANK=0 HEAD=10.0.0.1 NPROC=8 bash examples/multinode_torchrun.sh OUTPUT_DIR [overrides...]
# trainer.devices × trainer.num_nodes must equal torchrun's world size (fabricq checks it).
# OUTPUT_DIR must be on a file system every node sees. DRY_RUN=1 prints the command instead.
set -euo pipefail
out=${1:?output directory on a shared file system}; shift
nnodes=${NNODES:-1}; nproc=${NPROC:-1}; node_rank=${NODE_RANK:-0}; head=${HEAD:-127.0.0.1}; port=${PORT:-29500}
cmd=(torchrun --nnodes="$nnodes" --nproc-per-node="$nproc" --node-rank="$node_rank"
     --master-addr="$head" --master-port="$port"
     -m fabricq +recipe=gptq_w4 trainer.devices="$nproc" trainer.num_nodes="$nnodes" output_dir="$out" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
