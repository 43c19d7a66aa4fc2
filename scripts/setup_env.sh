#!/usr/bin/env bash
# Create (or update) .venv in the checkout and install dsc with its test, TensorRT-RTX and Ray extras,
# and headless Chromium for the report's browser test where apt-get can (never fails for it;
# DSC_NO_CHROMIUM=1 skips the attempt).
# DSC_CONSTRAINTS (default constraints/lock.txt: the exact versions the test suite passed with,
# torch==2.13.0 included, which resolves to the CPU wheel on the project's build machines) is
# handed to pip as a constraints file. constraints/cpu.txt pins only torch; an empty string
# (DSC_CONSTRAINTS=) lets pip choose every version within pyproject.toml's ranges.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${DSC_CONSTRAINTS-constraints/lock.txt}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
args=(-q -e ".[dev,rtx,ray]")
if [ -n "$CONSTRAINTS" ]; then
  args+=(-c "$CONSTRAINTS")
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install "${args[@]}"
if [ -z "${DSC_NO_CHROMIUM:-}" ]; then
  bash scripts/install_chromium.sh
fi
