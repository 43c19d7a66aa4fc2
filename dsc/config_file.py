"""dsc.yaml: every option a release pipeline pins, in one file; command-line flags override it.

    dsc build --config dsc.yaml                      # everything from the file
    dsc build --config dsc.yaml --max-batch 4        # the file, but max_batch from the flag
    dsc compile out/ --config dsc.yaml --profile h100  # on the device: compile keys only

Keys are the long options of `dsc build`, in snake_case (`max-batch` is accepted as
`max_batch`):

    checkpoint, output          paths; relative ones are relative to the file's directory
    profiles                    a list, or "a,b,c"; a profile file path is relative to the file
    set                         profile overrides: a list of "key=value", or a mapping
    dtype                       fp16 | bf16 | fp32
    opset                       18..23 (null: the exporter's default)
    max_batch, max_input_len, max_kv   the engine's shape envelope (null: the profile's)
    max_num_tokens                     prefill token budget: batch x prompt of one prefill pass
    backend                     auto | tensorrt_rtx | tensorrt
    dla_core                    DLA core on Jetson AGX Orin / Orin NX (standard TensorRT)
    validate                    auto (gate when quantized, else smoke) | smoke | gate | none
    validate_tokens             greedy tokens of the smoke check
    allow_pickle, force, rebuild   booleans
    optimize                    run the graph passes (default true)
    passes, disable_passes      lists of pass names (`dsc passes list`)
    quantize                    int8 | fp8 | int4 (AWQ) | null
    weight_only                 INT8 weight-only instead of W8A8 SmoothQuant
    calib                       calibration text / JSONL / directory (relative to the file)
    calib_method                max | percentile | entropy | mse
    alpha                       SmoothQuant migration strength: auto (per layer) or 0..1
    calib_samples, calib_seq_len   calibration windows and their length in tokens
    calibrate_by                auto | layer | graph: calibrate one decoder layer at a time
    exclude                     module patterns kept in float (list)
    quantize_lm_head            int8 | int4 | fp8 | null: lm_head weight-only (with `quantize`)
    quantize_embedding          int8 | int4 | fp8 | null: the embedding table (with `quantize`)

An unknown key is an error naming it (and the closest known key), and so is a value of the wrong
type. A flag given on the command line wins over the file; `--set` pairs are applied after the
file's `set`, so they win key by key. `dsc compile` reads the same file and uses the keys that
shape an engine (profiles, set, max_*, backend, dla_core, rebuild), ignoring the rest. No file
is read unless `--config` names it.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dsc.errors import BadInput

_INT_OR_NULL = ("opset", "max_batch", "max_input_len", "max_kv", "max_num_tokens", "dla_core")
_CHOICES = {
    "dtype": ("fp16", "bf16", "fp32"),
    "backend": ("auto", "tensorrt_rtx", "tensorrt"),
    "validate": ("auto", "smoke", "gate", "none"),
    "calibrate_by": ("auto", "layer", "graph"),
    "trace_layers": ("kinds", "all"),
}
_BOOLS = ("allow_pickle", "force", "rebuild", "optimize", "weight_only", "external_data", "stream")
_NAME_LISTS = ("passes", "disable_passes", "exclude")
_POS_INTS = ("validate_tokens", "calib_samples", "calib_seq_len")
KEYS = (
    "checkpoint",
    "output",
    "profiles",
    "set",
    *_INT_OR_NULL,
    *_CHOICES,
    *_POS_INTS,
    *_BOOLS,
    *_NAME_LISTS,
    "quantize",
    "calib",
    "calib_method",
    "alpha",
    "quantize_lm_head",
    "quantize_embedding",
)
COMPILE_KEYS = (
    "profiles",
    "set",
    "max_batch",
    "max_input_len",
    "max_kv",
    "max_num_tokens",
    "backend",
    "dla_core",
    "rebuild",
)


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The file's options, checked and normalised: {BuildConfig field or checkpoint/output: v}.

    `set` becomes `overrides` (a tuple of "key=value"), `profiles` a tuple of names/paths.
    """
    path = Path(path)
    from dsc.paths import read_text_bounded

    try:
        raw = yaml.safe_load(read_text_bounded(path, what="config file", kind="yaml"))
    except OSError as e:
        raise BadInput(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInput(
            f"{path}: not valid YAML ({getattr(e, 'problem', None) or e}{where})"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise BadInput(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    base = path.parent
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in KEYS:
            near = difflib.get_close_matches(k, KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise BadInput(f"unknown key '{key}' in {path}{hint} (known: {', '.join(KEYS)})")
        out_key, out_value = _check(k, value, path, base)
        out[out_key] = out_value
    return out


def _join(base: Path, value: str) -> Path:
    """`value` relative to the config file's directory, without `dir/../` left in it."""
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _fail(path: Path, key: str, expected: str, value: Any) -> BadInput:
    return BadInput(f"{key} in {path}: expected {expected}, got {value!r}")


def _check(key: str, value: Any, path: Path, base: Path) -> tuple[str, Any]:
    if key in ("checkpoint", "output", "calib"):
        if key == "calib" and value is None:
            return key, None
        if not isinstance(value, str) or not value:
            raise _fail(path, key, "a path", value)
        return key, _join(base, value) if key != "calib" else str(_join(base, value))
    if key in _NAME_LISTS:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _fail(path, key, "a list of names", value)
        return key, tuple(value)
    if key in ("quantize", "calib_method", "quantize_lm_head", "quantize_embedding"):
        known = (
            ("max", "percentile", "entropy", "mse")
            if key == "calib_method"
            else ("int8", "fp8", "int4")
        )
        if value is not None and value not in known:
            raise _fail(path, key, "one of " + ", ".join(known) + " or null", value)
        return key, value
    if key == "alpha":
        if value == "auto":
            return key, None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise _fail(path, key, "auto or a number in [0, 1]", value)
        return key, float(value)
    if key == "profiles":
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value]
        else:
            raise _fail(path, key, "a list of profile names or paths", value)
        return key, tuple(str(_join(base, v)) if _looks_like_path(v) else v for v in items)
    if key == "set":
        if isinstance(value, Mapping):
            pairs = [f"{k}={_scalar(v)}" for k, v in value.items()]
        elif isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
            pairs = list(value)
        else:
            raise _fail(path, key, 'a list of "key=value" or a mapping', value)
        return "overrides", tuple(pairs)
    if key in _INT_OR_NULL:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise _fail(path, key, "an integer or null", value)
        return key, value
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise _fail(path, key, "one of " + ", ".join(_CHOICES[key]), value)
        return key, value
    if key in _POS_INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(path, key, "a positive integer", value)
        return key, value
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise _fail(path, key, "true or false", value)
        return key, value
    raise AssertionError(key)  # pragma: no cover - KEYS and the checks disagree


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def merge(
    from_file: Mapping[str, Any], from_cli: Mapping[str, Any], explicit: set[str]
) -> dict[str, Any]:
    """File values, then the command line's explicitly given flags on top.

    `from_cli` holds every option's value (defaults included); only names in `explicit` win.
    `overrides` concatenate (file first), so a flag's key=value wins key by key.
    """
    out = dict(from_cli)
    for key, value in from_file.items():
        if key == "overrides":
            out[key] = tuple(value) + tuple(from_cli.get(key, ()) if key in explicit else ())
        elif key not in explicit:
            out[key] = value
    return out


def check_options(raw: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """`raw` (a mapping of dsc.yaml keys read from `path`) checked and normalised as
    `load_config_file` does; `dsc matrix` reads its shared build options with it."""
    path = Path(path)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = str(key).replace("-", "_")
        if k not in KEYS:
            near = difflib.get_close_matches(k, KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise BadInput(f"unknown key '{key}' in {path}{hint} (known: {', '.join(KEYS)})")
        out_key, out_value = _check(k, value, path, path.parent)
        out[out_key] = out_value
    return out
