#!/usr/bin/env bash
# Install what the project and its tests need, then run the whole test suite (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -r requirements-dev.txt
$PY -m pytest "$@"
