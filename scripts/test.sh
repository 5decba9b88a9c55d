#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (what CI runs), in CS2FUSION_TEST_WORKERS pytest-xdist processes
# (default 2: the suite mostly waits on Ray, MLflow and dvc start-up); tests that share a service run in one of them
# (their xdist_group, set in tests/conftest.py). Extra arguments go to pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -n "${CS2FUSION_TEST_WORKERS:-2}" --dist loadgroup "$@"
