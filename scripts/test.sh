#!/usr/bin/env bash
# Install lillm with its test dependencies, lint, then run the whole test suite (CPU, a few minutes).
#   bash scripts/test.sh                 (extra arguments go to pytest, e.g. -k model or -m slow)
# Outside a virtual environment it makes and uses .venv (scripts/python_env.sh); PYTHON=... chooses
# the interpreter, LILLM_EXTRAS=dev,browser adds optional extras (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python_env.sh
$PY -m pip install -q -e ".[${LILLM_EXTRAS:-dev}]"
$PY -m ruff check .
$PY -m pytest "$@"
