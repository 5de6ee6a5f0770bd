#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (real-model tests included).
# IFP_HYPOTHESIS_PROFILE=thorough runs many more random programs per property.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "test,onnx,hf,gguf,pte"
. .venv/bin/activate
exec python -m pytest "$@"
