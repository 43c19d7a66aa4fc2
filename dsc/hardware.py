"""Hardware profiles: one YAML file per target GPU, loaded into a frozen `HardwareProfile`.

A profile says what a target can hold and how fast it can go (memory, bandwidth, dense peak
throughput per precision), which precisions its engines may use, which TensorRT/JetPack it runs,
and the defaults the engine builder starts from (workspace, optimization level, the default
shape envelope). Built-in profiles live in `dsc.profiles` (`profiles/*.yaml`, figures and sources
from `shared/hardware-facts.md`); users pass their own file by path, and `--set key=value`
overrides one field (dotted keys, values parsed as YAML scalars and type-checked).

Loading is strict: an unknown key or a wrong type is a `BadInput` naming the key and the file;
then cross-field rules are checked (FP8 needs SM >= 89, BF16 and INT4 weight-only need SM >= 80,
every listed precision except INT4 weight-only has a peak figure, DLA only on Jetson, the
TensorRT-RTX target SM is one RTX can compile for, ...).

Two fields exist for the build stage. TensorRT-RTX compiles ahead of time, without a GPU, for
the SMs in `dsc.precision.RTX_TARGET_SMS` only:

- `rtx_target_sm`: the SM an RTX engine for this target is compiled for; null where RTX cannot
  target the GPU (H100/H200 are SM90, every Orin is SM87). Those engines are built on the device.
- `preflight_sm`: the SM of the off-device preflight compile (does the graph parse, does every
  layer have an implementation at this precision?). Equal to `rtx_target_sm` where that exists.
  SM87 (Orin) -> 80: Orin's tensor cores do the same 4,096 INT8 ops/clock/SM as A100's
  (hardware-facts §2b cross-check), it has sm_80's 164 KB shared memory per SM (sm_86 has 100 KB)
  and, like sm_80, no FP8. SM90 (Hopper) -> 89: the only RTX target that accepts FP8 Q/DQ, which
  Hopper runs; everything dsc emits for SM89 (fp16/bf16/int8/fp8/int4) Hopper runs too.

Jetson "Super" modes (JetPack 6.2 MAXN_SUPER) are separate profiles (`...-super`): they change
bandwidth (Nano) and compute (NX, Nano), and an engine must be built in the power mode it is
deployed in because nvpmodel gates TPCs (hardware-facts §2a, §6.7).

Units: memory sizes in GiB (2^30 bytes), bandwidth in GB/s (10^9 bytes/s), throughput in dense
(no 2:4 sparsity) TFLOPS/TOPS.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dsc.errors import BadInput
from dsc.precision import PROFILE_MIN_SM, RTX_TARGET_SMS, TARGET_PRECISIONS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GiB = 2**30

THROUGHPUT_KEYS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
KINDS = ("datacenter", "workstation", "jetson")
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
# What a preflight compiles (dsc.pipeline.preflight_graph): auto = the first layers, the last and
# the head above 1 GiB of weights; layers = that whatever the size; full = the whole graph.
PREFLIGHT_GRAPHS = ("auto", "layers", "full")

# Minimum SM per precision (hardware-facts §3: S19, S20, S21).


def _profiles_dir() -> Path:
    from dsc.profiles import PROFILES_DIR

    return Path(PROFILES_DIR)


# --- schema -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    kind: str  # "int", "number", "bool", "str", "strs", "enum"
    required: bool = True
    nullable: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()


_F = _Field
_SCHEMA: dict[str, Any] = {
    "schema_version": _F("int"),
    "name": _F("str"),
    "description": _F("str", required=False, default=""),
    "kind": _F("enum", choices=KINDS),
    "aliases": _F("strs", required=False, default=()),
    "compute_capability": _F("str"),
    "sm_count": _F("int", required=False, nullable=True),
    "memory": {
        "gb": _F("number"),
        "shared_with_cpu": _F("bool"),
        "bandwidth_gbps": _F("number"),
        "os_reserved_gb": _F("number", required=False, default=0.0),
        "runtime_overhead_gb": _F("number"),
    },
    "l2_mb": _F("number", required=False, nullable=True),
    "throughput_tflops": {k: _F("number", required=False, nullable=True) for k in THROUGHPUT_KEYS},
    "precisions": _F("strs"),
    "dla_cores": _F("int", required=False, default=0),
    "tensorrt": {
        "version": _F("str"),
        "jetpack": _F("str", required=False, nullable=True),
    },
    "rtx_target_sm": _F("int", nullable=True),
    "preflight_sm": _F("int"),
    "builder": {
        "workspace_gb": _F("number"),
        "optimization_level": _F("int"),
        "hardware_compatibility": _F(
            "enum", required=False, default="none", choices=HARDWARE_COMPATIBILITY
        ),
        "version_compatible": _F("bool", required=False, default=False),
        "preflight_graph": _F("enum", required=False, default="auto", choices=PREFLIGHT_GRAPHS),
    },
    "envelope": {
        "max_batch": _F("int"),
        "max_input_len": _F("int"),
        "max_kv": _F("int"),
        "max_num_tokens": _F("int", required=False, default=8192),
    },
    "power_mode": _F("str", required=False, nullable=True),
    "notes": _F("strs", required=False, default=()),
    "sources": _F("strs"),
}

_TYPE_WORDS = {
    "int": "an integer",
    "number": "a number",
    "bool": "true or false",
    "str": "a string",
    "strs": "a list of strings",
}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_value(value: Any, spec: _Field, key: str, source: str) -> Any:
    """Type-check one leaf; return it normalised (tuples for lists, floats for numbers)."""
    if value is None:
        if spec.nullable:
            return None
        raise BadInput(f"{key} in {source}: expected {_describe(spec)}, got null")
    ok: bool
    if spec.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif spec.kind == "bool":
        ok = isinstance(value, bool)
    elif spec.kind == "str":
        ok = isinstance(value, str)
    elif spec.kind == "enum":
        ok = isinstance(value, str) and value in spec.choices
    elif spec.kind == "strs":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - schema typo
        raise AssertionError(spec.kind)
    if not ok:
        raise BadInput(
            f"{key} in {source}: expected {_describe(spec)}, got {_type_name(value)} {value!r}"
        )
    return value


def _describe(spec: _Field) -> str:
    if spec.kind == "enum":
        return "one of " + ", ".join(spec.choices)
    return _TYPE_WORDS[spec.kind] + (" or null" if spec.nullable else "")


def _validate(data: Any, schema: Mapping[str, Any], source: str, prefix: str = "") -> dict:
    """Check keys and types against the schema; fill defaults. Returns a new nested dict."""
    where = prefix.rstrip(".") or "the profile"
    if not isinstance(data, Mapping):
        raise BadInput(f"{where} in {source}: expected a mapping, got {_type_name(data)}")
    for key in data:
        if key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
            raise BadInput(f"unknown key '{prefix}{key}' in {source}{hint}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        full = f"{prefix}{key}"
        if isinstance(spec, dict):
            if key not in data:
                raise BadInput(f"missing key {full!r} in {source}")
            out[key] = _validate(data[key], spec, source, f"{full}.")
        elif key in data:
            out[key] = _check_value(data[key], spec, full, source)
        elif spec.required:
            raise BadInput(f"missing key {full!r} in {source}")
        else:
            out[key] = spec.default
    return out


def _schema_node(dotted: str) -> Any:
    node: Any = _SCHEMA
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(node) if isinstance(node, dict) else ""
            at = ".".join(parts[:i]) or "top level"
            raise BadInput(f"unknown key {dotted!r} in --set (keys at {at}: {known})")
        node = node[part]
    return node


# --- the profile --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    gb: float
    shared_with_cpu: bool
    bandwidth_gbps: float
    os_reserved_gb: float
    runtime_overhead_gb: float

    @property
    def capacity_bytes(self) -> int:
        return int(self.gb * GiB)


@dataclass(frozen=True)
class Throughput:
    """Dense peak Tensor-Core throughput in TFLOPS (TOPS for int8/int4); None = unknown/absent."""

    fp32: float | None = None
    tf32: float | None = None
    fp16: float | None = None
    bf16: float | None = None
    fp8: float | None = None
    int8: float | None = None
    int4: float | None = None

    def peak(self, precision: str) -> float | None:
        return getattr(self, precision, None)


@dataclass(frozen=True)
class TensorRTVersions:
    version: str
    jetpack: str | None


@dataclass(frozen=True)
class Builder:
    workspace_gb: float
    optimization_level: int
    hardware_compatibility: str
    version_compatible: bool
    preflight_graph: str = "auto"


@dataclass(frozen=True)
class Envelope:
    """Default shape envelope: the max of the TensorRT optimization profile's shapes."""

    max_batch: int
    max_input_len: int
    max_kv: int
    # Prefill token budget (TensorRT-LLM's max_num_tokens, default 8192): see
    # dsc.backends.tensorrt._shapes for the prefill profile it shapes.
    max_num_tokens: int = 8192


@dataclass(frozen=True)
class HardwareProfile:
    """One target GPU. Do not confuse with a TensorRT optimization profile (shape ranges)."""

    schema_version: int
    name: str
    description: str
    kind: str
    aliases: tuple[str, ...]
    compute_capability: str
    sm_count: int | None
    memory: Memory
    l2_mb: float | None
    throughput_tflops: Throughput
    precisions: tuple[str, ...]
    dla_cores: int
    tensorrt: TensorRTVersions
    rtx_target_sm: int | None
    preflight_sm: int
    builder: Builder
    envelope: Envelope
    power_mode: str | None
    notes: tuple[str, ...]
    sources: tuple[str, ...]
    path: str | None = field(default=None, compare=False)
    overrides: tuple[str, ...] = ()

    @property
    def sm(self) -> int:
        """Compute capability as one integer: "8.7" -> 87."""
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)

    @property
    def is_jetson(self) -> bool:
        return self.kind == "jetson"

    def supports(self, precision: str) -> bool:
        return precision in self.precisions

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain data, in schema order (what `dsc profiles show` prints)."""
        d = asdict(self)
        for k in ("path", "overrides"):
            d.pop(k)
        d = {k: d[k] for k in _SCHEMA}

        def lists(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: lists(v) for k, v in x.items()}
            if isinstance(x, tuple):
                return [lists(v) for v in x]
            return x

        return lists(d)


def _build(data: dict[str, Any], path: str | None, overrides: tuple[str, ...]) -> HardwareProfile:
    return HardwareProfile(
        schema_version=data["schema_version"],
        name=data["name"],
        description=data["description"],
        kind=data["kind"],
        aliases=data["aliases"],
        compute_capability=data["compute_capability"],
        sm_count=data["sm_count"],
        memory=Memory(**data["memory"]),
        l2_mb=data["l2_mb"],
        throughput_tflops=Throughput(**data["throughput_tflops"]),
        precisions=data["precisions"],
        dla_cores=data["dla_cores"],
        tensorrt=TensorRTVersions(**data["tensorrt"]),
        rtx_target_sm=data["rtx_target_sm"],
        preflight_sm=data["preflight_sm"],
        builder=Builder(**data["builder"]),
        envelope=Envelope(**data["envelope"]),
        power_mode=data["power_mode"],
        notes=data["notes"],
        sources=data["sources"],
        path=path,
        overrides=overrides,
    )


def _check_rules(p: HardwareProfile, source: str) -> None:
    """Cross-field rules; each failure is one line naming the fields and the file."""

    def fail(msg: str) -> None:
        raise BadInput(f"{source}: {msg}")

    if p.schema_version != SCHEMA_VERSION:
        fail(
            f"schema_version {p.schema_version} is not supported (this dsc reads {SCHEMA_VERSION})"
        )
    # The name becomes a directory of the artifact (engines/<name>/).
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", p.name) or ".." in p.name:
        fail(
            f"name {p.name!r} must be letters, digits, '.', '_' or '-' (it names the "
            "directory engines/<name>/ of an artifact)"
        )
    if not re.fullmatch(r"\d{1,2}\.\d", p.compute_capability):
        fail(f'compute_capability {p.compute_capability!r} must look like "8.7"')
    sm = p.sm
    unknown = [x for x in p.precisions if x not in TARGET_PRECISIONS]
    if unknown:
        fail(f"precisions: unknown {', '.join(unknown)} (known: {', '.join(TARGET_PRECISIONS)})")
    if len(set(p.precisions)) != len(p.precisions):
        fail("precisions: listed twice")
    if "fp16" not in p.precisions:
        fail("precisions must include fp16 (the reference precision)")
    for prec in p.precisions:
        if sm < PROFILE_MIN_SM[prec]:
            fail(
                f"precision {prec} needs SM >= {PROFILE_MIN_SM[prec]}, but compute_capability "
                f"{p.compute_capability} is SM{sm}"
            )
        # INT4 here is weight-only (W4A16): its matmuls run at the fp16 rate.
        if prec != "int4" and p.throughput_tflops.peak(prec) is None:
            fail(f"precision {prec} is listed but throughput_tflops.{prec} is null")
    m = p.memory
    if min(m.gb, m.bandwidth_gbps) <= 0 or min(m.os_reserved_gb, m.runtime_overhead_gb) < 0:
        fail("memory: sizes and bandwidth must be positive")
    if m.os_reserved_gb + m.runtime_overhead_gb >= m.gb:
        fail("memory: os_reserved_gb + runtime_overhead_gb leaves nothing of memory.gb")
    if m.shared_with_cpu and not p.is_jetson:
        fail("memory.shared_with_cpu is only true on Jetson (kind: jetson)")
    if p.dla_cores and not p.is_jetson:
        fail("dla_cores > 0 needs kind: jetson (DLA exists only on Jetson modules)")
    if p.is_jetson != (p.tensorrt.jetpack is not None):
        fail("tensorrt.jetpack is set exactly when kind is jetson")
    if p.rtx_target_sm is not None:
        if p.rtx_target_sm not in RTX_TARGET_SMS:
            fail(
                f"rtx_target_sm {p.rtx_target_sm}: TensorRT-RTX compiles only for "
                f"SM{'/'.join(map(str, RTX_TARGET_SMS))} (use null)"
            )
        if p.rtx_target_sm != sm:
            fail(f"rtx_target_sm {p.rtx_target_sm} differs from the GPU's SM{sm}")
        if p.preflight_sm != p.rtx_target_sm:
            fail("preflight_sm must equal rtx_target_sm when RTX can target the GPU")
    if p.preflight_sm not in RTX_TARGET_SMS:
        fail(
            f"preflight_sm {p.preflight_sm} is not an SM TensorRT-RTX compiles for "
            f"({', '.join(map(str, RTX_TARGET_SMS))})"
        )
    b = p.builder
    if not 0 <= b.optimization_level <= 5:
        fail(f"builder.optimization_level {b.optimization_level} must be 0..5")
    if b.workspace_gb <= 0:
        fail("builder.workspace_gb must be positive")
    if b.hardware_compatibility == "ampere_plus" and sm < 80:
        fail("builder.hardware_compatibility ampere_plus needs an Ampere or newer GPU (SM >= 80)")
    if b.hardware_compatibility == "same_compute_capability" and sm < 75:
        fail("builder.hardware_compatibility same_compute_capability needs SM >= 75")
    if p.is_jetson and b.hardware_compatibility != "none":
        logger.warning(
            "%s: hardware compatibility is documented as unsupported on JetPack "
            "(TensorRT 8.6 guide; current status unconfirmed)",
            source,
        )
    e = p.envelope
    if min(e.max_batch, e.max_input_len, e.max_kv, e.max_num_tokens) <= 0:
        fail("envelope: max_batch, max_input_len, max_kv and max_num_tokens must be positive")
    if e.max_input_len > e.max_kv:
        fail(f"envelope.max_input_len {e.max_input_len} exceeds envelope.max_kv {e.max_kv}")


# --- loading ------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> Any:
    from dsc.paths import read_text_bounded

    try:
        text = read_text_bounded(path, what="profile", kind="yaml")
    except OSError as e:
        raise BadInput(f"cannot read profile {path}: {e}") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise BadInput(f"{path}: not valid YAML ({problem}{where})") from e


def parse_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """`["builder.workspace_gb=8"]` or `{"builder.workspace_gb": 8}` -> {dotted key: value}."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"--set {item!r}: expected key=value, e.g. builder.workspace_gb=8")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise BadInput(f"--set {item!r}: value is not a YAML scalar ({e})") from e
    return out


def _apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        node = _schema_node(key)
        if isinstance(node, dict):
            raise BadInput(f"--set {key}: is a group; set one of its keys ({', '.join(node)})")
        _check_value(value, node, key, "--set")
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return data


def _from_data(
    raw: Any, source: str, path: str | None, overrides: Mapping[str, Any]
) -> HardwareProfile:
    data = _validate(raw, _SCHEMA, source)  # the file alone must be valid
    label = source
    if overrides:
        raw = _apply_overrides(raw, overrides)
        data = _validate(raw, _SCHEMA, source)
        label = f"{source} with --set {', '.join(overrides)}"
    prof = _build(data, path, tuple(f"{k}={v}" for k, v in overrides.items()))
    _check_rules(prof, label)
    return prof


@functools.lru_cache(maxsize=1)
def _builtin_index() -> tuple[dict[str, Path], dict[str, str]]:
    """({profile name: file}, {alias: profile name}) for the built-in profiles."""
    files: dict[str, Path] = {}
    aliases: dict[str, str] = {}
    for f in sorted(_profiles_dir().glob("*.yaml")):
        files[f.stem] = f
    for name, f in files.items():
        raw = _read_yaml(f)
        for alias in (raw or {}).get("aliases") or []:
            if alias in files or alias in aliases:
                raise BadInput(f"{f}: alias {alias!r} is already a profile name or alias")
            aliases[alias] = name
    return files, aliases


def profile_names() -> list[str]:
    return sorted(_builtin_index()[0])


def aliases() -> dict[str, str]:
    """{alias: profile name} of the built-in profiles."""
    return dict(_builtin_index()[1])


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def resolve_name(name: str) -> Path:
    """The built-in profile file for a name or alias; an unknown name suggests the closest."""
    files, alias_map = _builtin_index()
    key = name.strip().lower()
    if key in files:
        return files[key]
    if key in alias_map:
        return files[alias_map[key]]
    near = difflib.get_close_matches(key, list(files) + list(alias_map), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    raise BadInput(
        f"unknown profile {name!r}{hint} (`dsc profiles list` shows all; a path "
        f"to a .yaml file works too)"
    )


def load_profile(
    name_or_path: str | Path, overrides: Mapping[str, Any] | Iterable[str] | None = None
) -> HardwareProfile:
    """Load a built-in profile by name or alias, or a user profile by path; apply overrides."""
    text = str(name_or_path)
    path = Path(text)
    if isinstance(name_or_path, Path) or _looks_like_path(text) or path.is_file():
        if not path.exists():
            raise BadInput(f"profile file {text} does not exist")
    else:
        path = resolve_name(text)
    raw = _read_yaml(path)
    return _from_data(raw, str(path), str(path), parse_overrides(overrides))


def list_profiles() -> list[HardwareProfile]:
    """Every built-in profile, sorted by name."""
    return [load_profile(f) for f in (_builtin_index()[0][n] for n in profile_names())]
