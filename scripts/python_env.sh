# Sourced by scripts/test.sh and scripts/quickstart.sh: sets PY, the Python that installs and runs lillm.
# Inside a virtual environment or a conda environment, that environment's Python is used as it is.
# Otherwise lillm makes its own virtual environment, .venv at the repository root (ignored by git),
# once, and installs there: a system Python (Debian/Ubuntu, PEP 668 "externally-managed-environment")
# refuses pip installs, and a user's own packages should not be touched. PYTHON=... chooses the
# interpreter (used as it is if it belongs to an environment, else the one .venv is made from).
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: no Python found as '$PY': install Python 3.10+ or set PYTHON=/path/to/python" >&2
  exit 2
fi
if ! "$PY" -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")) else 1)'; then
  if [ ! -x .venv/bin/python ]; then
    echo "== making a virtual environment in .venv (with $("$PY" -c 'import sys; print(sys.executable)'))"
    if ! "$PY" -m venv .venv; then
      echo "error: '$PY -m venv .venv' failed: install the venv module (Debian/Ubuntu: apt install python3-venv) or run inside an environment of your own" >&2
      exit 2
    fi
  fi
  PY=$PWD/.venv/bin/python
fi
