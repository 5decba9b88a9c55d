#!/usr/bin/env bash
# Creates .venv (once) and installs cs2fusion with its pipeline, cloud and test extras.
# torch is pinned to the CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${CS2FUSION_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
# --no-compile: pip would byte-compile all ~22k files of the venv (tens of seconds on 2 cores); Python compiles the
# modules it imports on first use instead
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  quiet .venv/bin/python -m pip install -q --no-compile "$TORCH_SPEC"
fi
quiet .venv/bin/python -m pip install -q --no-compile -e ".[pipeline,cloud,test]" -c scripts/constraints.txt
# The Winograd kernel, built once into the machine's cache (a no-op when built; without a compiler the fuser uses
# direct convolutions and this only warns).
.venv/bin/cs2fusion build-kernels || true
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true RAY_AUTH_MODE=disabled
