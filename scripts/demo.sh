#!/usr/bin/env bash
# README command 1: set up and run the demo on SmolLM2-135M-Instruct. Extra args go to `ifp-compile demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "hf,gguf"
. .venv/bin/activate
exec ifp-compile demo "$@"
