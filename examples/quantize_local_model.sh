#!/usr/bin/env bash
# Quantize a local Hugging Face folder with your own calibration text (W4, groups of 128).
#   bash examples/quantize_local_model.sh MODEL_DIR TEXT_FILE OUTPUT_DIR [extra overrides...]
# TEXT_FILE: .txt (documents split at blank lines), .jsonl/.json/.parquet (a `text` column).
set -euo pipefail
model=${1:?model folder}; text=${2:?calibration text file}; out=${3:?output directory}; shift 3
python -m fabricq +recipe=gptq_w4 \
    model.path="$model" data.path="$text" output_dir="$out" "$@"
python - "$out" <<'PY'
import json, sys
report = json.load(open(f"{sys.argv[1]}/report.json"))
print(f"ppl before {report.get('ppl_before')} -> after {report.get('ppl_after')}; wall {report['wall_s']:.1f} s")
PY
