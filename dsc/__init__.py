"""dsc: compile DeepSeek-family LLMs into validated, per-GPU TensorRT engines.

Importing dsc is cheap: torch, transformers, onnxruntime and TensorRT are imported lazily by the
stages that need them, so `dsc --help` works on a machine with none of them.
"""

from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout `passes/` and `profiles/` sit beside `dsc/` and are mapped to
# `dsc.passes` / `dsc.profiles` only by setuptools' package-dir at install time. Adding the
# checkout root to this package's search path gives the same names when dsc is imported
# straight from the checkout (pytest from the repo root, `python -m dsc`).
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "passes" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]  # noqa: F821
