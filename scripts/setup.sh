#!/usr/bin/env bash
# Creates .venv and installs the package with its test extra.
# torch is installed first, pinned, so that pip takes the local CPU wheel instead of resolving
# the package's torch range to a multi-GB CUDA build. Override with TORCH_SPEC="torch==X".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test,server]"
