#!/usr/bin/env bash
# Create (or update) .venv in the checkout and install dsc with its test and TensorRT-RTX extras.
# DSC_CONSTRAINTS (default constraints/cpu.txt) pins torch to the CPU build used on the project's
# build machines; set it to an empty string to let pip choose torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${DSC_CONSTRAINTS-constraints/cpu.txt}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
args=(-q -e ".[dev,rtx]")
if [ -n "$CONSTRAINTS" ]; then
  args+=(-c "$CONSTRAINTS")
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install "${args[@]}"
