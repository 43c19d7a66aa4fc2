"""Write constraints/lock.txt: the exact versions of the environment the tests passed in.

    .venv/bin/python scripts/freeze_lock.py [--out constraints/lock.txt]

Runs `pip freeze --exclude-editable` in this interpreter's environment (dsc itself, installed
editable, is left out) and writes one `name==version` per line, sorted, with:

- torch as `torch==2.13.0` whatever its local label (`+cpu` here): the CPU wheel of the build
  machines and a CUDA build elsewhere both satisfy it;
- a `python_version >= "X.Y"` marker on each pin whose release does not support the oldest
  Python dsc supports (its `Requires-Python`; X.Y = this interpreter's version): there, pip
  picks that package itself within pyproject.toml's ranges instead of failing to resolve.

`scripts/setup_env.sh` installs with the lock by default (`DSC_CONSTRAINTS`, README.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
TORCH = "2.13.0"
OLDEST_PYTHON = "3.11"  # pyproject.toml's requires-python

HEADER = """\
# Exact versions the test suite passed with (Python {py}, Linux x86-64): dsc's dependencies and
# its dev, rtx and ray extras. Written by `.venv/bin/python scripts/freeze_lock.py`; installed by
# scripts/setup_env.sh (DSC_CONSTRAINTS, README.md). torch stays ==2.13.0 (any local build).
# A marker leaves a pin out on Python {oldest}, where that release is not installable.
"""


def lock_lines() -> list[str]:
    """`name==version[; marker]` for every distribution `pip freeze` lists, dsc excluded."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = []
    for raw in out.splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#") or "==" not in raw:
            continue
        name, version = raw.split("==", 1)
        if name.lower() == "dsc":
            continue
        if name.lower() == "torch":
            version = TORCH
        line = f"{name}=={version}"
        requires = metadata.distribution(name).metadata.get("Requires-Python")
        if requires and OLDEST_PYTHON not in SpecifierSet(requires):
            line += f'; python_version >= "{here}"'
        lines.append(line)
    return sorted(lines, key=str.lower)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "constraints" / "lock.txt"))
    args = ap.parse_args()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    text = HEADER.format(py=py, oldest=OLDEST_PYTHON) + "\n".join(lock_lines()) + "\n"
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
