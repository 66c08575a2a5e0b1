#!/usr/bin/env bash
# Installs the project (editable) with the given extras (default: train,test).
# Without a CUDA GPU it first pins torch==2.13.0, the CPU build, so no CUDA wheels are ever pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-train,test}
if ! (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1); then
  python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet -e ".[$extras]"
