#!/usr/bin/env bash
# Install lillm with its test dependencies, lint, then run the whole test suite (CPU, a few minutes).
#   bash scripts/test.sh                 (extra arguments go to pytest, e.g. -k model or -m slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q -e ".[dev]"
$PY -m ruff check .
$PY -m pytest "$@"
