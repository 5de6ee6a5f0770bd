#!/usr/bin/env bash
# README command 1: set up and run the demo on SmolLM2-135M-Instruct. Extra args go to `ifp-compile demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "hf,gguf"
. .venv/bin/activate
# set-up, once per machine: SmolLM2's GGUF file converted into the float32 checkpoint that
# load_smollm2 caches (~/.cache/ifp-compile or $IFP_COMPILE_CACHE_DIR; about 35 s the first time)
python -c "from ifp_compile.real_model import prepare_smollm2; print('[setup] SmolLM2 checkpoint:', prepare_smollm2())" >&2
exec ifp-compile demo "$@"
