#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (real-model tests included).
# IFP_HYPOTHESIS_PROFILE=thorough runs many more random programs per property.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh "test,onnx,hf,gguf,pte,ray"
. .venv/bin/activate
# two worker processes (pytest-xdist), one torch thread each: on 2 cores the suite's many
# small single-threaded steps (export, tracing, Python passes) overlap instead of queueing.
# A test module stays in one worker (--dist loadfile), so module fixtures load once.
# IFP_TEST_WORKERS=0 runs everything in this process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -n "${IFP_TEST_WORKERS:-2}" --dist loadfile "$@"
