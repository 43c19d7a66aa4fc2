"""ONNX → serialized TensorRT engine, with standard TensorRT or TensorRT-RTX.

    build_engine(onnx, ShapeEnvelope(...), BuildOptions(target_sm=89), backend="tensorrt_rtx")
        parse from file (external data works) into a strongly typed network
        → two optimization profiles, prefill then decode, from the shape envelope
        → workspace, optimization level, target SM / DLA / compatibility options
        → build_serialized_network → EngineBuildResult (bytes or file, layers, profiles, log)

Every TensorRT message goes to a list on the result and to this module's logger. Failures are one
line: a parser error names the node and operator; a build error carries the last error lines,
condensed. A target that cannot run the graph's precision (FP32 GEMM on Turing, FP8 below SM89,
INT4/BF16 below SM80) raises `Unsupported` (exit 4); any other failure `BackendError` (exit 7).

`trtexec_command` gives the equivalent command line for building on the device with standard
TensorRT. `inspect_engine` reports what the runtime can say about an engine; without a GPU that
is nothing (see docs/TENSORRT.md).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from dsc import signals
from dsc.backends.tensorrt._loader import Flavour, TrtFlavourApi, load_trt, trt_version
from dsc.backends.tensorrt._shapes import (
    ProfileShapes,
    ShapeEnvelope,
    infer_io_roles,
    io_roles_from_spec,
    profile_shapes,
)
from dsc.errors import BackendError, BadInput, Unsupported

logger = logging.getLogger(__name__)

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
_TRTEXEC_HWC = {
    "none": "none",
    "ampere_plus": "ampere+",
    "same_compute_capability": "sameComputeCapability",
}


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings; None leaves TensorRT's default."""

    target_sm: int | None = None  # TensorRT-RTX ahead-of-time target: 75, 80, 86, 89, 120
    workspace_mib: int | None = None  # memory pool limit for the workspace
    optimization_level: int | None = None  # builder optimization level, 0..5
    timing_cache: Path | None = None  # loaded if present, saved after the build (standard only)
    hardware_compatibility: str | None = None  # none | ampere_plus | same_compute_capability
    version_compatible: bool = False
    dla_core: int | None = None  # standard TensorRT on a Jetson: build for this DLA core
    gpu_fallback: bool = True  # with dla_core: layers the DLA cannot run go to the GPU
    verbose: bool = False  # keep TensorRT's VERBOSE messages too

    def __post_init__(self):
        if self.hardware_compatibility is not None:
            level = self.hardware_compatibility.lower().replace("+", "_plus").replace("-", "_")
            if level not in HARDWARE_COMPATIBILITY:
                raise BadInput(
                    f"unknown hardware compatibility level "
                    f"{self.hardware_compatibility!r} "
                    f"(expected one of {', '.join(HARDWARE_COMPATIBILITY)})"
                )
            object.__setattr__(self, "hardware_compatibility", level)
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise BadInput(
                f"builder optimization level must be 0..5, got {self.optimization_level}"
            )
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise BadInput(f"workspace must be at least 1 MiB, got {self.workspace_mib}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))


@dataclass(frozen=True)
class LogRecord:
    severity: str  # INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE
    message: str


@dataclass
class EngineBuildResult:
    engine: bytes | None  # the serialized engine, unless it was written to engine_path
    engine_path: Path | None
    size_bytes: int
    build_seconds: float  # parse + build
    flavour: Flavour
    trt_version: str
    target_sm: int | None
    num_layers: int  # layers of the parsed network (before fusion)
    profiles: list[ProfileShapes]
    strongly_typed: bool
    memory_bytes: dict[str, int] = field(default_factory=dict)  # from the builder's report
    timing_cache_path: Path | None = None
    options: BuildOptions = field(default_factory=BuildOptions)
    log: list[LogRecord] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [r.message for r in self.log if r.severity == "WARNING"]

    @property
    def errors(self) -> list[str]:
        return [r.message for r in self.log if r.severity in ("ERROR", "INTERNAL_ERROR")]

    def to_json(self) -> dict:
        """A JSON-ready summary for the manifest and report (no engine bytes, no full log)."""
        opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()}
        return {
            "engine": self.engine_path.name if self.engine_path else None,
            "size_bytes": self.size_bytes,
            "build_seconds": round(self.build_seconds, 3),
            "backend": self.flavour.value,
            "trt_version": self.trt_version,
            "target_sm": self.target_sm,
            "num_layers": self.num_layers,
            "strongly_typed": self.strongly_typed,
            "profiles": [p.to_json() for p in self.profiles],
            "memory_bytes": dict(self.memory_bytes),
            "timing_cache": str(self.timing_cache_path) if self.timing_cache_path else None,
            "options": opts,
            "warnings": self.warnings,
        }


def _make_logger(trt: ModuleType, verbose: bool):
    """An ILogger of `trt` that keeps every message and forwards it to the Python logger."""
    sev = trt.ILogger.Severity
    # A failure reaches the user once, as the exception built from these records; forwarded
    # at ERROR level it would also print TensorRT's raw text above dsc's one-line message.
    to_python = {
        sev.INTERNAL_ERROR: logging.INFO,
        sev.ERROR: logging.INFO,
        sev.WARNING: logging.INFO,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: 5,
    }

    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.records: list[LogRecord] = []

        def log(self, severity, msg):
            if severity == sev.VERBOSE and not verbose:
                return
            name = getattr(severity, "name", str(severity))
            self.records.append(LogRecord(name, str(msg)))
            logger.log(to_python.get(severity, logging.DEBUG), "%s", msg)

    return CaptureLogger()


def _cancel_monitor(trt: ModuleType):
    """A progress monitor that cancels the build once SIGINT/SIGTERM is pending (None: this
    TensorRT has no IProgressMonitor)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class CancelOnSignal(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def phase_finish(self, phase_name):
            pass

        def step_complete(self, phase_name, step):
            return not signals.pending()

    return CancelOnSignal()


# -- error messages ---------------------------------------------------------------------------

_NOISE = re.compile(r"Thread context has not been set")


def _condense(message: str) -> str:
    """TensorRT's error text without source locations and wrappers."""
    text = " ".join(message.split())
    text = re.sub(r"\[[^\]\s]*\.(?:cpp|cu|h)\b[^\]]*\]\s*", "", text)  # [pass.cpp:337: fn]
    text = re.sub(r"^(?:[\w:]+: )?Error Code \d+: [^(]*?\((.*)\)$", r"\1", text)
    text = re.sub(r"\s*In \w+ at /[^\s()]+", "", text).strip()  # In fn at /_src/x.cpp:12
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    return text.strip()


def condense_errors(records: list[LogRecord], last: int = 2) -> str:
    errors = [
        _condense(r.message)
        for r in records
        if r.severity in ("ERROR", "INTERNAL_ERROR") and not _NOISE.search(r.message)
    ]
    picked: list[str] = []
    for text in reversed(errors):
        if text and text not in picked:
            picked.append(text)
        if len(picked) == last:
            break
    joined = " | ".join(reversed(picked)) or "no error message from TensorRT"
    return joined if len(joined) <= 600 else joined[:597] + "..."


# Why a target cannot run the graph, in TensorRT-RTX's words, and what would.
_NEEDS = {
    "fp8": "SM89 or newer",
    "fp8_e4m3": "SM89 or newer",
    "fp4": "SM120",
    "int4": "SM80 or newer",
    "b16": "SM80 or newer (bf16)",
    "bf16": "SM80 or newer",
}
_UNSUPPORTED_OP = re.compile(r"Cannot compile operation '([^']+)' for ([^:]+): (.+?)\.?$")
_UNSUPPORTED_TYPE = re.compile(
    r"Cannot compile for target\(s\) ([\w, ]+), because the model contains HW-specific "
    r"datatypes: ([\w, ]+)"
)


_OUT_OF_MEMORY = re.compile(r"OutOfMemory \(Requested size was (\d+) bytes")


class WorkspaceTooSmall(BackendError):
    """The builder needed more scratch than the workspace pool allows (exit 7).

    TensorRT-RTX's compiler backend sizes the scratch of a fused region for the optimization
    profiles' largest shapes and takes it from the WORKSPACE pool: measured at
    R1-Distill-Qwen-1.5B, about 240 KB per prefill token (7.85 GB asked for 8 x 4,096 tokens).
    `requested_bytes` is what it asked for, `workspace_bytes` the pool limit (None: unlimited).
    """

    def __init__(self, message: str, requested_bytes: int = 0, workspace_bytes: int | None = None):
        super().__init__(message)
        self.requested_bytes = requested_bytes
        self.workspace_bytes = workspace_bytes


def _classify_build_failure(
    records: list[LogRecord], what: str, workspace_bytes: int | None = None
) -> Exception:
    summary = condense_errors(records)
    for r in reversed(records):
        if r.severity not in ("ERROR", "INTERNAL_ERROR"):
            continue
        text = _condense(r.message)
        m = _OUT_OF_MEMORY.search(r.message)
        if m:
            # The builder sizes buffers for the profiles' largest shapes: the prefill profile's
            # batch x prompt (attention scores grow with prompt^2) is what to shrink.
            asked = int(m.group(1))
            pool = f" (workspace pool {workspace_bytes / 2**30:.2f} GiB)" if workspace_bytes else ""
            raise_to = (
                f", or raise builder.workspace_gb (--set builder.workspace_gb="
                f"{math.ceil(asked / 2**30)})"
                if workspace_bytes
                else ""
            )
            return WorkspaceTooSmall(
                f"{what} failed: the builder could not allocate {asked / 2**30:.2f} GiB{pool} "
                f"for the optimization profiles' largest shapes; lower --max-num-tokens, "
                f"--max-input-len or --max-batch{raise_to}",
                asked,
                workspace_bytes,
            )
        m = _UNSUPPORTED_TYPE.search(text)
        if m:
            types = [t.strip() for t in m.group(2).split(",")]
            needs = "; ".join(f"{t} needs {_NEEDS[t]}" for t in types if t in _NEEDS)
            needs = f" ({needs})" if needs else ""
            return Unsupported(
                f"{what}: the graph uses {', '.join(types)}, which "
                f"{m.group(1).upper()} cannot run{needs}"
            )
        m = _UNSUPPORTED_OP.search(text)
        if m:
            hint = (
                " (export the graph in fp16, or target SM80+)" if "FP32 GEMM" in m.group(3) else ""
            )
            return Unsupported(
                f"{what}: node {m.group(1)!r} cannot run on {m.group(2)}: {m.group(3)}{hint}"
            )
    return BackendError(f"{what} failed: {summary}")


def _parser_failure(parser, onnx_path: Path, label: str, records: list[LogRecord]) -> BackendError:
    """One line naming the first failing node, its operator and TensorRT's reason."""
    n = int(parser.num_errors)
    if n == 0:
        return BackendError(f"{label} could not parse {onnx_path.name}: {condense_errors(records)}")
    err = parser.get_error(0)

    def call(name, default=None):
        fn = getattr(err, name, None)
        try:
            return fn() if callable(fn) else default
        except Exception:
            return default

    desc = " ".join(str(call("desc", "")).split())
    plugin_missing = "Plugin not found" in desc
    node_index = call("node", -1)
    node_name = call("node_name", "") or ""
    op = call("node_operator", "") or ""
    code = getattr(call("code"), "name", "")
    where = ""
    if node_index is not None and int(node_index) >= 0:
        where = f" at node {int(node_index)}"
        if node_name:
            where += f" {node_name!r}"
        if op:
            where += f" ({op})"
    if plugin_missing:
        reason = f"operator {op or '?'} is not supported (no importer or plugin)"
    else:
        reason = desc or code or "unknown parser error"
    more = f" (+{n - 1} more)" if n > 1 else ""
    return BackendError(f"{label} could not parse {onnx_path.name}{where}: {reason}{more}")


# -- the build --------------------------------------------------------------------------------

_MEMORY = re.compile(
    r"Total (Host Persistent|Device Persistent|Scratch|Activation|Weights) "
    r"Memory: (\d+) bytes|Max Scratch Memory: (\d+) bytes"
)


def _memory_report(records: list[LogRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        m = _MEMORY.search(r.message)
        if m:
            key = (m.group(1) or "Scratch").lower().replace(" ", "_")
            out[key] = int(m.group(2) or m.group(3))
    return out


def resolve_io_roles(
    onnx_path: Path, io_roles: Mapping | None = None, io_spec: Mapping | None = None
) -> dict[str, tuple]:
    """The axis roles to shape profiles by: explicit roles, else the io spec, else the graph."""
    if io_roles is not None:
        return {str(k): tuple(v) for k, v in io_roles.items()}
    if io_spec is not None:
        return io_roles_from_spec(io_spec)
    return infer_io_roles(onnx_path)


def _write_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; an artifact is meant to be shipped
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(
    onnx_path: str | Path,
    envelope: ShapeEnvelope,
    options: BuildOptions | None = None,
    *,
    backend: Flavour | str | None = None,
    io_roles: Mapping[str, tuple] | None = None,
    io_spec: Mapping | None = None,
    engine_path: str | Path | None = None,
) -> EngineBuildResult:
    """Build one engine with a prefill and a decode profile.

    `backend` picks the flavour (default: standard TensorRT if importable, else TensorRT-RTX).
    Input axis roles come from `io_roles`, else `io_spec` (the exporter's model_io.json), else
    the graph itself. With `engine_path` the engine is written there (atomically) and not kept
    in memory.
    """
    options = options or BuildOptions()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInput(f"ONNX file not found: {onnx_path}")
    roles = resolve_io_roles(onnx_path, io_roles, io_spec)
    trt, flavour = load_trt(backend)
    api = TrtFlavourApi(trt, flavour)
    version = trt_version(trt)
    label = f"{flavour.label} {version}"
    target = f"SM{options.target_sm}" if options.target_sm else "the default targets"
    if flavour is Flavour.TENSORRT and not options.target_sm:
        target = "this GPU"

    # Refuse options this flavour cannot honour before any expensive work.
    api.check_options(
        dla_core=options.dla_core,
        hardware_compatibility=options.hardware_compatibility,
        version_compatible=options.version_compatible,
        target_sm=options.target_sm,
    )

    log = _make_logger(trt, options.verbose)
    start = time.perf_counter()
    builder = trt.Builder(log)
    network = builder.create_network(api.network_flags())
    parser = trt.OnnxParser(network, log)
    # From the file, not from bytes: the parser then finds external weight files beside it.
    # TensorRT calls the Python logger from C++ and swallows what it raises: a Ctrl-C there
    # would be lost, so signals wait for the call to return (`dsc.signals.deferred`).
    with signals.deferred():
        parsed = parser.parse_from_file(str(onnx_path))
    if not parsed:
        raise _parser_failure(parser, onnx_path, label, log.records)
    strongly_typed = api.is_strongly_typed(network)
    if not strongly_typed:
        logger.warning("%s did not create a strongly typed network", label)

    net_shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        net_shapes[tensor.name] = tuple(int(d) for d in tensor.shape)
    missing = [n for n, s in net_shapes.items() if any(d < 0 for d in s) and n not in roles]
    if missing:
        raise BadInput(f"no axis roles for dynamic graph input(s) {', '.join(missing)}")
    roles = {n: r for n, r in roles.items() if n in net_shapes}
    profiles = profile_shapes(roles, envelope, net_shapes)

    config = builder.create_builder_config()
    notes = api.set_target(config, options.target_sm)
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.hardware_compatibility not in (None, "none"):
        api.set_hardware_compatibility(config, options.hardware_compatibility)
    if options.version_compatible:
        api.set_version_compatible(config)
    if options.dla_core is not None:
        api.set_dla(builder, config, options.dla_core, options.gpu_fallback)

    for spec in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.shapes.items():
            try:
                profile.set_shape(name, lo, opt, hi)
            except (ValueError, TypeError) as e:
                raise BackendError(
                    f"{label} rejected the {spec.name} profile of {name!r} "
                    f"(min {lo}, opt {opt}, max {hi}): {e}"
                ) from None
        if config.add_optimization_profile(profile) < 0:
            raise BackendError(
                f"{label} rejected the {spec.name} optimization profile: "
                f"{condense_errors(log.records)}"
            )

    cache = None
    cache_path = options.timing_cache
    if cache_path is not None and not api.supports_timing_cache():
        notes.append(
            f"timing cache {cache_path} not used: {flavour.label} timing cache "
            f"operations are no-ops (deprecated in TensorRT-RTX 1.2)"
        )
        cache_path = None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, False):
            notes.append(
                f"timing cache {cache_path} does not match this TensorRT/GPU; starting a new one"
            )
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    for note in notes:
        logger.info("%s", note)
        log.records.append(LogRecord("INFO", note))

    num_layers = int(network.num_layers)
    logger.info(
        "building %s engine from %s for %s (%d layers, %d profiles)",
        label,
        onnx_path.name,
        target,
        num_layers,
        len(profiles),
    )
    monitor = _cancel_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor  # a signal cancels the build at its next step
    with signals.deferred():
        serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        what = f"{label} build of {onnx_path.name} for {target}"
        raise _classify_build_failure(
            log.records,
            what,
            options.workspace_mib << 20 if options.workspace_mib is not None else None,
        )

    size = int(serialized.nbytes)
    if cache is not None and cache_path is not None:
        _write_atomic(cache_path, cache.serialize())
    engine_bytes = None
    out_path = None
    if engine_path is not None:
        out_path = Path(engine_path)
        _write_atomic(out_path, serialized)
    else:
        engine_bytes = bytes(memoryview(serialized))
    del serialized
    logger.info("built %s engine: %.1f MiB in %.1f s", label, size / 2**20, seconds)
    return EngineBuildResult(
        engine=engine_bytes,
        engine_path=out_path,
        size_bytes=size,
        build_seconds=seconds,
        flavour=flavour,
        trt_version=version,
        target_sm=options.target_sm,
        num_layers=num_layers,
        profiles=profiles,
        strongly_typed=strongly_typed,
        memory_bytes=_memory_report(log.records),
        timing_cache_path=cache_path if cache is not None else None,
        options=options,
        log=list(log.records),
    )


# -- trtexec ----------------------------------------------------------------------------------


def _shape_spec(shapes: Mapping[str, tuple], which: int) -> str:
    parts = []
    for name, triple in shapes.items():
        quoted = f"'{name}'" if ":" in name or "," in name else name
        parts.append(f"{quoted}:" + "x".join(str(d) for d in triple[which]))
    return ",".join(parts)


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    envelope: ShapeEnvelope,
    options: BuildOptions | None = None,
    *,
    io_roles: Mapping[str, tuple] | None = None,
    io_spec: Mapping | None = None,
    network_shapes: Mapping[str, tuple] | None = None,
    skip_inference: bool = True,
    trtexec: str = "trtexec",
) -> list[str]:
    """argv of the standard-TensorRT `trtexec` build equivalent to `build_engine`.

    Profiles use trtexec's `--profile=N` syntax: each `--profile=N` must be followed directly by
    that profile's --minShapes/--optShapes/--maxShapes (samples/common/sampleOptions.cpp,
    getOptimizationProfiles). Inputs whose every axis is fixed are left out. `shlex.join` the
    result for a shell.
    """
    options = options or BuildOptions()
    if options.target_sm is not None:
        logger.debug(
            "trtexec builds for the GPU it runs on; target SM%s is not an option", options.target_sm
        )
    roles = resolve_io_roles(Path(onnx_path), io_roles, io_spec)
    profiles = profile_shapes(roles, envelope, network_shapes)
    argv = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    for index, spec in enumerate(profiles):
        dynamic = {
            n: s for n, s in spec.shapes.items() if any(isinstance(r, str) for r in roles[n])
        }
        argv += [
            f"--profile={index}",
            f"--minShapes={_shape_spec(dynamic, 0)}",
            f"--optShapes={_shape_spec(dynamic, 1)}",
            f"--maxShapes={_shape_spec(dynamic, 2)}",
        ]
    if options.workspace_mib is not None:
        argv.append(f"--memPoolSize=workspace:{options.workspace_mib}M")
    if options.optimization_level is not None:
        argv.append(f"--builderOptimizationLevel={options.optimization_level}")
    if options.timing_cache is not None:
        argv.append(f"--timingCacheFile={options.timing_cache}")
    if options.hardware_compatibility not in (None, "none"):
        argv.append(f"--hardwareCompatibilityLevel={_TRTEXEC_HWC[options.hardware_compatibility]}")
    if options.version_compatible:
        argv.append("--versionCompatible")
    if options.dla_core is not None:
        argv.append(f"--useDLACore={options.dla_core}")
        if options.gpu_fallback:
            argv.append("--allowGPUFallback")
    if skip_inference:
        argv.append("--skipInference")
    return argv


def trtexec_command_line(*args, **kwargs) -> str:
    """`trtexec_command` as one shell-quoted line."""
    return shlex.join(trtexec_command(*args, **kwargs))


# -- inspection -------------------------------------------------------------------------------


@dataclass
class EngineInspection:
    flavour: Flavour
    size_bytes: int
    validity: str | None = None  # TensorRT-RTX get_engine_validity: VALID, SUBOPTIMAL, INVALID
    diagnostics: list[str] = field(default_factory=list)
    deserialized: bool = False
    reason: str | None = None  # why it could not be deserialized
    num_layers: int | None = None
    io_tensors: dict[str, dict] = field(default_factory=dict)
    profiles: list[dict[str, tuple]] = field(default_factory=list)
    log: list[LogRecord] = field(default_factory=list)


def inspect_engine(
    engine: bytes, trt: ModuleType | None = None, flavour: Flavour | str | None = None
) -> EngineInspection:
    """What the runtime can tell about a serialized engine; never raises for a missing GPU.

    Deserializing needs a CUDA device and driver (both flavours); without one, `deserialized` is
    False and `reason` says why. TensorRT-RTX's header check (`get_engine_validity`) also needs
    the driver: on a machine without one it answers INVALID.
    """
    if trt is None:
        trt, flavour = load_trt(flavour)
    else:
        flavour = Flavour.parse(flavour or getattr(trt, "__name__", "tensorrt"))
    log = _make_logger(trt, False)
    runtime = trt.Runtime(log)
    out = EngineInspection(flavour=flavour, size_bytes=len(engine))
    if hasattr(runtime, "get_engine_validity"):
        try:
            validity, diag = runtime.get_engine_validity(engine)
            out.validity = getattr(validity, "name", str(validity))
            flags = getattr(trt, "EngineInvalidityDiagnostics", None)
            if flags is not None:
                out.diagnostics = [
                    name for name, member in flags.__members__.items() if int(diag) & int(member)
                ]
        except Exception as e:
            out.diagnostics = [f"{type(e).__name__}: {e}"]
    try:
        cuda_engine = runtime.deserialize_cuda_engine(engine)
    except Exception as e:
        cuda_engine = None
        out.reason = f"{type(e).__name__}: {e}"
    if cuda_engine is None:
        out.reason = out.reason or condense_errors(log.records)
        out.log = list(log.records)
        return out
    out.deserialized = True
    out.num_layers = int(cuda_engine.num_layers)
    names = [cuda_engine.get_tensor_name(i) for i in range(cuda_engine.num_io_tensors)]
    for name in names:
        out.io_tensors[name] = {
            "mode": cuda_engine.get_tensor_mode(name).name,
            "dtype": cuda_engine.get_tensor_dtype(name).name,
            "shape": tuple(cuda_engine.get_tensor_shape(name)),
        }
    inputs = [n for n in names if out.io_tensors[n]["mode"] == "INPUT"]
    for p in range(cuda_engine.num_optimization_profiles):
        out.profiles.append(
            {n: tuple(tuple(s) for s in cuda_engine.get_tensor_profile_shape(n, p)) for n in inputs}
        )
    out.log = list(log.records)
    return out
