"""Hardware profiles, one YAML file per target (installed as `dsc.profiles`)."""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
