#!/usr/bin/env bash
# Sweep recipes with Hydra multirun: one complete output directory per job under SWEEP_DIR/<n>.
#   bash examples/sweep_recipes.sh MODEL_DIR TEXT_FILE SWEEP_DIR [extra overrides...]
set -euo pipefail
model=${1:?model folder}; text=${2:?calibration text file}; sweep=${3:?sweep directory}; shift 3
python -m fabricq -m recipe=gptq_w4,gptq_w8,rtn_w4 \
    model.path="$model" data.path="$text" hydra.sweep.dir="$sweep" "$@"
for job in "$sweep"/*/; do
    [ -f "$job/report.json" ] && python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['scheme']['bits'], r.get('ppl_after'))" "$job/report.json"
done
