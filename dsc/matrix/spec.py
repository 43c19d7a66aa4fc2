"""MATRIX.yaml: models x precisions x profiles, plus the build options every cell shares.

    models:                     # checkpoint directories (relative to this file), or
      - examples/models/tiny-qwen2
      - {path: /ckpt/R1-Distill-Qwen-7B, name: r1-7b}   # name: OUT/<name>/ (default: dir name)
    precisions: [fp16, int8, fp8, int4]                 # fp16 | bf16 | fp32 | int8 | fp8 | int4
    profiles: [a100-80gb, h100-sxm, l4, t4, jetson-orin-agx]
    options:                    # optional: any dsc.yaml key but checkpoint/output/profiles/quantize
      calib_samples: 32
      max_input_len: 2048

Each (model, precision) is one cell: the artifact `OUT/<model-name>/<precision>/` that
`dsc build <model> --profile <every legal profile> [--int8|--fp8|--int4-awq] -o ...` writes.
A profile that cannot run the precision (`dsc.precision.check_on_profile`, the one legality
rule) is skipped for that cell, with the reason; a cell with no legal profile is skipped.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsc.errors import BadInput, Unsupported

TOP_KEYS = ("models", "precisions", "profiles", "options")
DTYPES = ("fp16", "bf16", "fp32")
QUANTIZED = {"int8": "--int8", "fp8": "--fp8", "int4": "--int4-awq"}
# Keys the matrix axes set per cell; the shared options may not.
AXIS_KEYS = ("checkpoint", "output", "profiles", "quantize")
# dsc.yaml key -> `dsc build` flag, where they differ.
FLAGS = {
    "calib_method": "--method",
    "calib_samples": "--samples",
    "calib_seq_len": "--seq-len",
    "disable_passes": "--disable-pass",
    "overrides": "--set",
}


@dataclass(frozen=True)
class Model:
    name: str
    path: Path


@dataclass
class Cell:
    """One (model, precision): one artifact with an engine per legal profile."""

    model: Model
    precision: str
    output: Path
    profiles: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # profile -> why not

    @property
    def key(self) -> str:
        return f"{self.model.name}/{self.precision}"

    @property
    def runnable(self) -> bool:
        return bool(self.profiles)

    def config_values(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The cell's `BuildConfig` fields: the shared options plus its precision and profiles."""
        values = dict(options)
        values["profiles"] = self.profiles
        if self.precision in DTYPES:
            values["dtype"] = self.precision
        else:
            values["quantize"] = self.precision
        return values

    def command(self, options: Mapping[str, Any]) -> list[str]:
        """The `dsc build` command line that writes this cell's artifact on its own."""
        argv = ["dsc", "build", str(self.model.path), "-o", str(self.output)]
        for p in self.profiles:
            argv += ["--profile", p]
        if self.precision in QUANTIZED:
            argv.append(QUANTIZED[self.precision])
        values = dict(options)
        if self.precision in DTYPES:
            values["dtype"] = self.precision
        for key, value in values.items():
            flag = FLAGS.get(key, "--" + key.replace("_", "-"))
            if value is None or value == () or value is False and key != "optimize":
                continue
            if key == "optimize":
                if value is False:
                    argv.append("--no-optimize")
            elif value is True:
                argv.append(flag)
            elif isinstance(value, (tuple, list)):
                for v in value:
                    argv += [flag, str(v)]
            else:
                argv += [flag, str(value)]
        return argv

    def to_json(self, options: Mapping[str, Any]) -> dict:
        argv = self.command(options)
        return {
            "model": self.model.name,
            "checkpoint": str(self.model.path),
            "precision": self.precision,
            "output": str(self.output),
            "profiles": list(self.profiles),
            "skipped_profiles": dict(self.skipped),
            "status": "planned" if self.runnable else "skipped",
            "argv": argv if self.runnable else None,
            "command": shlex.join(argv) if self.runnable else None,
        }


@dataclass
class Matrix:
    path: Path
    models: tuple[Model, ...]
    precisions: tuple[str, ...]
    profiles: tuple[str, ...]
    options: dict[str, Any]

    def cells(self, out: Path) -> list[Cell]:
        """Every (model, precision), with the profiles that can run it and why the others not."""
        from dsc.hardware import load_profile
        from dsc.precision import check_on_profile

        loaded = {p: load_profile(p, self.options.get("overrides") or None) for p in self.profiles}
        cells = []
        for m in self.models:
            for prec in self.precisions:
                ok, skipped = [], {}
                for name, prof in loaded.items():
                    try:
                        check_on_profile(prof, prec)
                    except Unsupported as e:
                        skipped[name] = str(e)
                    else:
                        ok.append(name)
                cells.append(Cell(m, prec, Path(out) / m.name / prec, tuple(ok), skipped))
        return cells


def load_matrix(path: str | Path) -> Matrix:
    """MATRIX.yaml, checked: a one-line `BadInput` (exit 3) for any problem, before any work."""
    from dsc.config_file import check_options
    from dsc.paths import read_text_bounded

    path = Path(path)
    try:
        raw = yaml.safe_load(read_text_bounded(path, what="matrix file", kind="yaml"))
    except OSError as e:
        raise BadInput(f"cannot read matrix file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(
            f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})"
        ) from None
    if not isinstance(raw, Mapping):
        raise BadInput(f"{path}: expected a mapping with {', '.join(TOP_KEYS[:3])}")
    for key in raw:
        if key not in TOP_KEYS:
            import difflib

            near = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise BadInput(
                f"unknown key '{key}' in {path}{hint} (known: {', '.join(TOP_KEYS)}; build "
                "options go under 'options')"
            )
    for key in TOP_KEYS[:3]:
        if not raw.get(key):
            raise BadInput(f"{path}: '{key}' must list at least one entry")
    models = tuple(_model(v, path) for v in _list(raw, "models", path))
    names = [m.name for m in models]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise BadInput(f"{path}: two models are named {sorted(dup)[0]!r}; give one a 'name'")
    precisions = tuple(str(p) for p in _list(raw, "precisions", path))
    for p in precisions:
        if p not in (*DTYPES, *QUANTIZED):
            known = ", ".join((*DTYPES, *QUANTIZED))
            raise BadInput(f"{path}: unknown precision {p!r} (known: {known})")
    if len(set(precisions)) != len(precisions):
        raise BadInput(f"{path}: a precision is listed twice")
    profiles = tuple(str(p) for p in _list(raw, "profiles", path))
    opts = raw.get("options") or {}
    if not isinstance(opts, Mapping):
        raise BadInput(f"{path}: 'options' must be a mapping of dsc.yaml keys")
    for key in opts:
        if str(key).replace("-", "_") in AXIS_KEYS:
            raise BadInput(
                f"{path}: '{key}' is set per cell by the matrix (models, precisions, profiles, "
                "-o); remove it from options"
            )
    options = check_options(opts, path)
    if options.get("dtype") == "fp32" and any(p in QUANTIZED for p in precisions):
        raise BadInput(f"{path}: quantized precisions need dtype fp16 or bf16, not fp32")
    matrix = Matrix(path, models, precisions, profiles, options)
    # Profile names, overrides and every cell's options are checked now, not by a worker.
    from dsc.build_config import BuildConfig

    for p in profiles:
        from dsc.hardware import load_profile

        load_profile(p, options.get("overrides") or None)
    keys = set(BuildConfig.keys())
    for prec in precisions:
        cell = Cell(models[0], prec, Path("."), profiles)
        BuildConfig(**{k: v for k, v in cell.config_values(options).items() if k in keys})
    return matrix


def _list(raw: Mapping, key: str, path: Path) -> list:
    value = raw[key]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise BadInput(f"{path}: '{key}' must be a list")
    return value


def _model(value: Any, path: Path) -> Model:
    import os

    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("path"), str):
        raise BadInput(f"{path}: a model is a checkpoint path or {{path: ..., name: ...}}")
    extra = set(value) - {"path", "name"}
    if extra:
        raise BadInput(f"{path}: unknown model key '{sorted(extra)[0]}' (known: path, name)")
    p = Path(os.path.normpath(path.parent / Path(value["path"]).expanduser()))
    if not (p / "config.json").is_file():
        raise BadInput(f"{path}: model {value['path']} not found ({p} has no config.json)")
    name = str(value.get("name") or p.name)
    if not name or "/" in name or name in (".", ".."):
        raise BadInput(f"{path}: bad model name {name!r}")
    return Model(name, p)
