#!/usr/bin/env bash
# Create .venv (once) and install idgbr with its test extras. Idempotent; works offline except for PyPI.
# torch/torchvision are pinned in pyproject.toml only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]"
