"""Hardware profiles, one YAML file per target (installed as `dsc.profiles`).

Each `<name>.yaml` is loaded by `dsc.hardware.load_profile` into a `HardwareProfile`; the schema,
the cross-field rules and the units are documented in `dsc/hardware.py`. Figures and their
source ids (S1, S24, ...) come from `shared/hardware-facts.md`; a figure it marks unconfirmed is
marked so here too, in a comment or in `notes`. Aliases (`a100`, `h100`, `jetson-orin`) are
declared in the profile they resolve to. Jetson "Super" power modes are separate
`...-super` profiles.
"""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent
