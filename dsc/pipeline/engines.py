"""Compile one target into `engines/<profile>/` of an artifact being written.

    rtx        model.engine  (TensorRT-RTX, ahead of time for the profile's SM; no GPU needed)
               build.json    EngineBuildResult summary + every TensorRT message
    device     model.engine  (standard TensorRT on this GPU)
               timing.cache  (loaded from the previous artifact when there is one, saved back)
               build.json
    preflight  preflight.json  TensorRT-RTX compile for `preflight_sm` (engine discarded)
               trtexec.sh      the standard-TensorRT build of the real engine, run on the device
                               from the artifact root (`dsc compile ARTIFACT --profile P` there
                               does the same and records it in the manifest)

An RTX engine runs with the TensorRT-RTX runtime only; a standard TensorRT engine only with the
TensorRT version and GPU it was built with. The manifest says which each engine is.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from dsc.backends.tensorrt import (
    BuildOptions,
    EngineBuildResult,
    ShapeEnvelope,
    WorkspaceTooSmall,
    trtexec_command,
)
from dsc.backends.tensorrt import build_engine as _trt_build_engine
from dsc.errors import DscError
from dsc.models.checkpoint import sha256_file
from dsc.pipeline.progress import Progress
from dsc.pipeline.targets import Target

ENGINES_DIR = "engines"
ENGINE_FILE = "model.engine"
TIMING_CACHE = "timing.cache"
RUNTIME = {
    "tensorrt_rtx": "TensorRT-RTX runtime (tensorrt_rtx); not standard TensorRT",
    "tensorrt": "standard TensorRT runtime, same version and GPU model as the build",
}


def build_engine(*args, **kwargs) -> EngineBuildResult:
    """The TensorRT builder (a module attribute, so tests can count or replace it)."""
    return _trt_build_engine(*args, **kwargs)


@dataclass
class CompileResult:
    entry: dict  # the manifest's profiles.<name> record (without plan/profile, added by caller)
    seconds: float
    log: list[tuple[str, str]]
    envelope: ShapeEnvelope | None = None  # what the engine was built for, when not the target's
    notes: tuple[str, ...] = ()  # what the compile changed, for the manifest's profile notes
    options: BuildOptions | None = None  # the engine's options, when the compile changed them


RETRIES = 5  # builds after the first: lowered prefill batches, then one raised workspace


def build_within_workspace(
    onnx_path: Path,
    envelope: ShapeEnvelope,
    options,
    progress: Progress,
    label: str,
    *,
    max_workspace_bytes: int | None = None,
    **kwargs,
) -> tuple[EngineBuildResult, ShapeEnvelope, BuildOptions]:
    """`build_engine`, and when the builder's scratch exceeds the workspace pool
    (`WorkspaceTooSmall`), again with fewer sequences per prefill pass.

    The scratch grows about linearly with the prefill profile's batch (measured, see
    WorkspaceTooSmall), so a retry takes the prefill batch x workspace / requested x 0.9
    (at least one less than before); at most RETRIES retries in all. When one sequence per pass
    still needs more and `max_workspace_bytes` (the pool plus the plan's margin; None: never)
    allows, the pool is raised to the request rounded up to a GiB. Returns the result, the
    envelope it was built for (max_num_tokens lowered when needed) and the options it used.
    Raises WorkspaceTooSmall when nothing allowed fits.
    """
    from dataclasses import replace

    env = envelope
    for attempt in range(RETRIES + 1):
        try:
            return build_engine(onnx_path, env, options, **kwargs), env, options
        except WorkspaceTooSmall as e:
            batch = env.max_prefill_batch
            if not e.workspace_bytes or attempt == RETRIES:
                raise
            if batch <= 1:
                need = -(-e.requested_bytes // 2**30) * 2**30
                if (
                    max_workspace_bytes is None
                    or need > max_workspace_bytes
                    or need <= e.workspace_bytes
                ):
                    raise
                progress.detail(
                    f"{label} one {env.max_input_len}-token prefill asks for "
                    f"{e.requested_bytes / 2**30:.2f} GiB of scratch; workspace "
                    f"raised to {need // 2**30} GiB (within the plan's margin)"
                )
                options = replace(options, workspace_mib=need >> 20)
                continue
            new = max(1, min(batch - 1, int(batch * e.workspace_bytes / e.requested_bytes * 0.9)))
            progress.detail(
                f"{label} the builder asked for {e.requested_bytes / 2**30:.2f} GiB "
                f"of scratch (workspace {e.workspace_bytes / 2**30:.2f} GiB) at "
                f"{batch} x {env.max_input_len} prefill tokens; retrying at {new}"
            )
            env = replace(env, max_num_tokens=new * env.max_input_len)
    raise AssertionError("unreachable: the last attempt returns or raises")


def engine_dir(name: str) -> str:
    return f"{ENGINES_DIR}/{name}"


def _log_records(result: EngineBuildResult, progress: Progress, label: str) -> list:
    records = [(r.severity, r.message) for r in result.log]
    for sev, msg in records:
        progress.detail(f"{label} {sev}: {' '.join(msg.split())}")
    return records


def _summary(result: EngineBuildResult, records: list) -> dict:
    data = result.to_json()
    data["log"] = [{"severity": s, "message": m} for s, m in records]
    return data


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _with_name(e: DscError, text: str) -> DscError:
    """The same error class (so the exit code is kept) with the target named."""
    return type(e)(text)


def compile_target(
    target: Target, root: Path, io: dict, progress: Progress, *, previous: Path | None = None
) -> CompileResult:
    """Build `target` into `root/engines/<name>/` (root: the artifact being written)."""
    name = target.name
    out = root / engine_dir(name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    onnx_path = root / io["onnx"]
    label = f"[{name}]"
    try:
        if target.mode == "preflight":
            return _preflight(target, root, out, onnx_path, io, progress, label)
        return _engine(target, root, out, onnx_path, io, progress, label, previous)
    except DscError as e:
        what = (
            f"preflight compile for SM{target.preflight_options.target_sm}"
            if target.mode == "preflight"
            else "engine build"
        )
        raise _with_name(e, f"{name}: {what}: {e}") from None


def _engine(
    target: Target,
    root: Path,
    out: Path,
    onnx_path: Path,
    io: dict,
    progress: Progress,
    label: str,
    previous: Path | None,
) -> CompileResult:
    backend = "tensorrt_rtx" if target.mode == "rtx" else "tensorrt"
    options = target.options
    cache_note = "TensorRT-RTX: timing cache operations are no-ops (none written)"
    if backend == "tensorrt":
        cache = out / TIMING_CACHE
        old = previous / engine_dir(target.name) / TIMING_CACHE if previous else None
        if old is not None and old.is_file():
            shutil.copyfile(old, cache)  # a copy: the builder rewrites it
            cache_note = "timing cache loaded from the previous artifact and saved back"
        else:
            cache_note = "new timing cache saved"
        from dataclasses import replace

        options = replace(options, timing_cache=cache)
    engine_path = out / ENGINE_FILE
    result, built_env, used = build_within_workspace(
        onnx_path,
        target.envelope,
        options,
        progress,
        label,
        backend=backend,
        io_spec=io,
        engine_path=engine_path,
        max_workspace_bytes=_workspace_ceiling(target, options),
    )
    records = _log_records(result, progress, label)
    _write_json(out / "build.json", _summary(result, records))
    rel_engine = engine_path.relative_to(root).as_posix()
    cache_rel = (
        options.timing_cache.relative_to(root).as_posix()
        if options.timing_cache is not None and options.timing_cache.is_file()
        else None
    )
    entry = {
        "status": "built",
        "sm": target.profile.sm,
        "engine": {
            "path": rel_engine,
            "sha256": sha256_file(engine_path),
            "size_bytes": int(engine_path.stat().st_size),
            "backend": backend,
            "trt_version": result.trt_version,
            "target_sm": result.target_sm,
            "build_seconds": round(result.build_seconds, 3),
            "num_layers": result.num_layers,
            "runtime": RUNTIME[backend],
            "memory_bytes": dict(result.memory_bytes),
        },
        "preflight": None,
        "device_command": None,
        "timing_cache": {"path": cache_rel, "note": cache_note},
    }
    notes = _changes(target.envelope, built_env, options, used)
    return CompileResult(
        entry,
        result.build_seconds,
        records,
        built_env if built_env != target.envelope else None,
        notes,
        used if used != options else None,
    )


def _workspace_ceiling(target: Target, options) -> int | None:
    """How far the workspace pool may grow: the profile's pool plus the plan's margin, unless
    the user set builder.workspace_gb (then never)."""
    from dsc.hardware import parse_overrides

    if options.workspace_mib is None or "builder.workspace_gb" in parse_overrides(
        target.profile.overrides
    ):
        return None
    margin = (target.plan or {}).get("margin_bytes")
    if margin is None or margin <= 0:
        return None
    return (options.workspace_mib << 20) + int(margin)


def _changes(asked: ShapeEnvelope, built: ShapeEnvelope, options, used) -> tuple[str, ...]:
    notes = []
    if built != asked:
        notes.append(_lowered_note(asked, built, used))
    if used.workspace_mib != options.workspace_mib:
        notes.append(
            f"workspace raised from {options.workspace_mib / 1024:g} to "
            f"{used.workspace_mib / 1024:g} GiB: one {built.max_input_len}-token "
            f"prefill needs that much builder scratch (within the plan's margin)"
        )
    return tuple(notes)


def _lowered_note(asked: ShapeEnvelope, built: ShapeEnvelope, options) -> str:
    ws = options.workspace_mib / 1024 if options.workspace_mib else 0
    return (
        f"prefill batch lowered from {asked.max_prefill_batch} to {built.max_prefill_batch} "
        f"(max_num_tokens {built.max_num_tokens}) so the builder's scratch fits the "
        f"{ws:g} GiB workspace; decode keeps batch {built.max_batch}"
    )


def _preflight(
    target: Target, root: Path, out: Path, onnx_path: Path, io: dict, progress: Progress, label: str
) -> CompileResult:
    from dsc.pipeline.preflight_graph import preflight_graph

    pre = target.preflight_options
    with preflight_graph(onnx_path, target.profile.builder.preflight_graph) as (path, graph):
        if graph["graph"] == "layers":
            progress.detail(
                f"{label} preflight compiles {graph['meaning']}: "
                f"{graph['compiled_weights_bytes'] / 2**30:.2f} of "
                f"{graph['weights_bytes'] / 2**30:.2f} GiB of weights"
            )
        result, built_env, used = build_within_workspace(
            path,
            target.envelope,
            pre,
            progress,
            label,
            backend="tensorrt_rtx",
            io_spec=io,
            max_workspace_bytes=_workspace_ceiling(target, pre),
        )
    records = _log_records(result, progress, label)
    preflight = {
        "sm": pre.target_sm,
        "stands_in_for": target.profile.sm,
        "passed": True,
        "backend": "tensorrt_rtx",
        "trt_version": result.trt_version,
        "size_bytes": int(result.size_bytes),
        "seconds": round(result.build_seconds, 3),
        "num_layers": result.num_layers,
        "meaning": (
            f"the graph parses and every layer compiles at {io.get('dtype')} for "
            f"SM{pre.target_sm}, the nearest SM TensorRT-RTX targets; the SM"
            f"{target.profile.sm} engine itself is built on the device"
        ),
        "graph": graph,
    }
    if graph["graph"] == "layers":
        preflight["meaning"] += (
            f"; compiled: {graph['meaning']}, so size_bytes is that graph's engine"
        )
    notes = tuple(
        f"preflight: {n}; trtexec.sh keeps the envelope and workspace asked for"
        for n in _changes(target.envelope, built_env, pre, used)
    )
    if notes:
        preflight["prefill_batch"] = built_env.max_prefill_batch
        preflight["meaning"] += f" ({'; '.join(notes)})"
    _write_json(out / "preflight.json", preflight | {"build": _summary(result, records)})
    script = out / "trtexec.sh"
    script.write_text(trtexec_script(target, io))
    os.chmod(script, 0o755)
    entry = {
        "status": "awaiting_device_build",
        "sm": target.profile.sm,
        "engine": None,
        "preflight": {
            k: preflight[k]
            for k in (
                "sm",
                "passed",
                "backend",
                "trt_version",
                "size_bytes",
                "seconds",
                "num_layers",
                "graph",
            )
        },
        "device_command": script.relative_to(root).as_posix(),
        "timing_cache": {
            "path": None,
            "note": "written on the device by trtexec.sh / dsc "
            "compile (engines/<profile>/timing.cache)",
        },
    }
    return CompileResult(entry, result.build_seconds, records, None, notes)


def trtexec_script(target: Target, io: dict) -> str:
    """A POSIX shell script that builds the target's engine with trtexec, from the artifact root."""
    name = target.name
    d = engine_dir(name)
    from dataclasses import replace

    options = replace(target.options, timing_cache=Path(f"{d}/{TIMING_CACHE}"))
    argv = trtexec_command(io["onnx"], f"{d}/{ENGINE_FILE}", target.envelope, options, io_spec=io)
    env = target.envelope
    return (
        "#!/bin/sh\n"
        f"# Build the {name} engine (SM{target.profile.sm}) on the device with standard TensorRT.\n"
        f"# dsc could not build it where the artifact was made: "
        f"{'; '.join(target.notes) or 'see manifest.json'}.\n"
        f"# Envelope: batch <= {env.max_batch}, input <= {env.max_input_len}, "
        f"KV <= {env.max_kv} tokens, prefill batch <= {env.max_prefill_batch} "
        f"(max_num_tokens {env.max_num_tokens}); two profiles (0 prefill, 1 decode).\n"
        f"# Preferred: `dsc compile <artifact> --profile {name}` on the device, which does the\n"
        "# same build and records the engine and its hash in manifest.json (after this script,\n"
        "# `dsc verify` reports the engine as not listed).\n"
        "set -e\n"
        'cd "$(dirname "$0")/../.."\n'
        f"{shlex.join(argv)}\n"
    )
