#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (what CI runs), in CS2FUSION_TEST_WORKERS pytest-xdist processes
# (default 2: the suite mostly waits on Ray, MLflow and dvc start-up); tests that share a service run in one of them
# (their xdist_group, set in tests/conftest.py). Extra arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
WORKERS=${CS2FUSION_TEST_WORKERS:-2}
# one share of the cores per process: beside the other process, 2 OpenMP threads each made the 30-step literal test
# 3.2x slower than alone, 1 thread each 1.9x
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 ))}
exec .venv/bin/python -m pytest -n "$WORKERS" --dist loadgroup "$@"
