"""Artifact manifests: the format, hashing, the JSON Schema check, `dsc inspect` and `dsc verify`.

`manifest.json` (format `dsc-artifact`, schema version 1; JSON Schema in
`dsc/schemas/manifest.schema.json`):

    format, schema_version, created, command   what wrote it, and when
    tools                  dist -> version (torch, onnx, onnxruntime, TensorRT, ...), null if absent
    precision              the dtype of the graph handed to the builder (fp32, fp16, bf16)
    source                 checkpoint path, architecture, family, sizes; inputs: file -> sha256
    graph                  the ONNX handed to the builder: file, dtype, opset, files -> sha256, hash
    options                the resolved build options (dsc build / dsc compile)
    stages                 name -> {status, input_hash, inputs, outputs: file -> sha256, seconds}
                           (compile: {status, profiles: name -> the same record})
    profiles               name -> resolved hardware profile, envelope, builder options, engine
                           or preflight, the device command
    validation             {kind: smoke | gate, passed, ...}
    outputs                every file of the artifact but manifest.json -> sha256

A stage's `input_hash` is the sha256 of the canonical JSON of its `inputs` (content hashes of the
files it reads, its options, tool versions), so a re-run with equal inputs reuses its outputs.
`verify_artifact` re-hashes every file against `outputs` (and, on request, the checkpoint against
`source.inputs`); files on disk that the manifest does not list are mismatches too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsc.artifacts import ARTIFACT_FORMAT, MANIFEST, SCHEMA_VERSION, load_manifest
from dsc.errors import BadInput, CheckFailed
from dsc.models.checkpoint import sha256_file, sha256_file_cached

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "manifest.schema.json"
STAGE_ORDER = ("export", "optimize", "quantize", "compile", "validate")

__all__ = [
    "STAGE_ORDER",
    "VerifyResult",
    "canonical_hash",
    "check_schema",
    "export_manifest",
    "format_inspect",
    "hash_tree",
    "inspect_artifact",
    "now",
    "schema_errors",
    "sha256_file",
    "verify_artifact",
    "write_manifest",
]


# The distributions whose versions shape an artifact (recorded in `tools`; stage inputs pick
# the ones that shape their output).
TOOL_DISTS = (
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx-ir",
    "tensorrt",
    "tensorrt-rtx-cu13",
)


def tool_versions(dists: tuple[str, ...] = TOOL_DISTS) -> dict[str, str | None]:
    """{"dsc": its version, dist: installed version or None for each of `dists`}, in order."""
    from importlib import metadata

    from dsc import __version__

    versions: dict[str, str | None] = {"dsc": __version__}
    for dist in dists:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def canonical_hash(data: Any) -> str:
    """sha256 of `data` as canonical JSON (sorted keys, no whitespace; paths as strings)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def relpath(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def hash_tree(
    root: Path, *, exclude: tuple[str, ...] = (MANIFEST,), known: Mapping[str, str] | None = None
) -> dict[str, str]:
    """sha256 of every regular file under `root` (relative posix paths), sorted by path.
    `known`: digests already computed for some of them (relative path: hex), taken as they
    are: only for files written once and not touched since (`dsc export`'s data file)."""
    root = Path(root)
    known = known or {}
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = relpath(p, root)
        if rel in exclude or not p.is_file() or p.is_symlink():
            continue
        out[rel] = known[rel] if rel in known else sha256_file(p)
    return out


# --- schema ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def schema_errors(manifest: Mapping) -> list[str]:
    """Every way `manifest` breaks the JSON Schema, one line each ("at a.b: message")."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "top level"
        errors.append(f"at {where}: {err.message}")
    return errors


def check_schema(manifest: Mapping, where: str = MANIFEST) -> None:
    errors = schema_errors(manifest)
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BadInput(f"{where} does not match the manifest schema: {errors[0]}{more}")


def write_manifest(directory: Path, manifest: dict, *, check: bool = True) -> Path:
    """Check `manifest` against the schema and write it (an invalid one is a dsc bug).

    `check=False` is for updating an artifact whose manifest already breaks the schema (written
    by an older dsc or another tool): its records are kept as they are.
    """
    errors = schema_errors(manifest) if check else []
    if errors:
        raise AssertionError(f"dsc wrote an invalid manifest: {'; '.join(errors[:3])}")
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


def write_derived_manifest(
    directory: Path, manifest: dict, source: Mapping, source_path: Path
) -> Path:
    """Write the manifest of an artifact made from `source_path` (dsc optimize / quantize).

    Checked against the schema, unless the source's own manifest breaks it (written before the
    schema): then its format is kept and the new records are added unchecked.
    """
    if schema_errors(source):
        logger.warning(
            "%s has a pre-schema manifest; written without the schema check", source_path
        )
        return write_manifest(directory, manifest, check=False)
    return write_manifest(directory, manifest)


# --- the export record (dsc export and the export stage of dsc build) ------------------------


def graph_record(directory: Path, io: Mapping, hashes: Mapping[str, str] | None = None) -> dict:
    """The ONNX graph an artifact hands to the builder: its files, their hashes, one hash.

    `hashes`: sha256 already computed for files of `directory` (relative path: hex digest, as
    `hash_tree` returns), used instead of reading them again (a data file is 31 GB at
    DeepSeek-V2-Lite)."""
    directory = Path(directory)
    onnx_name = str(io["onnx"])
    names = [onnx_name, f"{onnx_name}.data", "model_io.json"]
    known = hashes or {}
    files = {
        n: known.get(n) or sha256_file(directory / n) for n in names if (directory / n).is_file()
    }
    return {
        "onnx": onnx_name,
        "dtype": io.get("dtype"),
        "opset": io.get("opset"),
        "files": files,
        "hash": canonical_hash(files),
    }


def checkpoint_hashes(info, stop=None) -> dict[str, str]:
    """sha256 of every file the export reads from the checkpoint ({relative path: hex}),
    remembered per file as it is (`dsc.models.checkpoint.sha256_file_cached`: the same
    checkpoint is exported and built again and again).

    `stop`: a `threading.Event`; once set, hashing ends early with
    `dsc.models.checkpoint.HashCancelled` (for a hash running beside the export that failed)."""
    return {relpath(p, info.path): sha256_file_cached(p, stop=stop) for p in info.input_files()}


def export_inputs(
    info,
    *,
    dtype: str,
    opset: int | None,
    tools: Mapping[str, Any],
    external_data: bool = False,
    stream: bool = False,
    trace_layers: str = "kinds",
    checkpoint=None,
) -> dict:
    """What the export stage depends on: checkpoint content, dtype, opset, where the weights
    go (`--external-data`), how they are read (`--stream`) and traced (`--trace-layers`,
    streaming only), exporter versions. `checkpoint`: the checkpoint's hashes when already
    computed or being computed (a `concurrent.futures.Future` of `checkpoint_hashes`, which
    `ExportStage.run` resolves once the graph is written); None: hashed here."""
    return {
        "checkpoint": checkpoint_hashes(info) if checkpoint is None else checkpoint,
        "dtype": dtype,
        "opset": opset,
        "external_data": external_data,
        "stream": stream,
        "trace_layers": trace_layers if stream else "all",
        "tools": {
            k: tools.get(k)
            for k in ("dsc", "torch", "transformers", "onnx", "onnxscript", "onnx-ir")
        },
    }


def export_manifest(
    info,
    directory: Path,
    io: Mapping,
    record: Mapping,
    *,
    tools: Mapping[str, Any],
    known: Mapping[str, str] | None = None,
) -> dict:
    """The manifest `dsc export` writes: source, graph, the export stage's `record` (its
    `to_json()`; outputs filled in here), every output's hash (`known`: see `hash_tree`)."""
    directory = Path(directory)
    inputs = record["inputs"]
    outputs = hash_tree(directory, known=known)
    return {
        "format": ARTIFACT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": now(),
        "command": "export",
        "tools": dict(tools),
        "precision": inputs["dtype"],
        "source": source_record(info, inputs["checkpoint"]),
        "graph": graph_record(directory, io, outputs),
        "stages": {
            "export": dict(record, outputs=dict(outputs)),
        },
        "outputs": outputs,
    }


def source_record(info, inputs: Mapping[str, str]) -> dict:
    return {
        "checkpoint": str(Path(info.path).resolve()),
        "architecture": info.architecture,
        "family": info.family.name,
        "num_parameters": info.num_parameters,
        "weight_bytes": info.weight_bytes,
        "inputs": dict(inputs),
    }


# --- verify ---------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    artifact: Path
    checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, what is wrong)
    inputs_checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "artifact": str(self.artifact),
            "ok": self.ok,
            "checked": self.checked,
            "inputs_checked": self.inputs_checked,
            "problems": [{"file": f, "problem": p} for f, p in self.problems],
            "notes": list(self.notes),
        }


def verify_artifact(
    artifact: str | Path, *, check_inputs: bool = False, checkpoint: str | Path | None = None
) -> VerifyResult:
    """Check everything the manifest claims. Never raises for a mismatch: see `problems`.

    - every file in `outputs` is there, a regular file, with that sha256; every file and
      directory on disk is listed (a directory holding no listed file is a problem too);
    - a symbolic link or special file is a problem and is never opened, nor is a listed name
      that leads outside the artifact (absolute, `..`, through a link);
    - `graph.files` and every stage's outputs agree with `outputs` (a stage's record of a file a
      later stage rewrote is not compared);
    - with `check_inputs` (or an explicit `checkpoint`), the checkpoint files are re-hashed
      against `source.inputs`, under the same containment rules.
    """
    from dsc.artifacts import manifest_paths
    from dsc.paths import contained, odd_entries

    artifact = Path(artifact)
    manifest = load_manifest(artifact, check=False)
    result = VerifyResult(artifact)
    problems = result.problems
    odd = dict(odd_entries(artifact))
    for rel, why in odd.items():
        problems.append((rel, f"{why} (not followed)"))
    outside: set[str] = set()
    for where, name in manifest_paths(manifest):
        try:
            contained(artifact, name, what=where)
        except BadInput:
            if str(name) not in outside:
                outside.add(str(name))
                problems.append(
                    (
                        str(name),
                        f"{where} names a path outside the artifact or through a link (not opened)",
                    )
                )
    listed = manifest.get("outputs")
    listed = listed if isinstance(listed, dict) else {}
    for rel, digest in sorted(listed.items()):
        if rel in outside or rel in odd or _under_odd(rel, odd):
            continue
        path = artifact / rel
        if not path.is_file():
            problems.append((rel, "missing"))
            continue
        result.checked += 1
        actual = sha256_file(path)
        if actual != digest:
            problems.append(
                (rel, f"sha256 {actual[:12]}… differs from the manifest's {str(digest)[:12]}…")
            )
    parents = {p.as_posix() for rel in listed for p in Path(rel).parents}
    for dirpath, dirnames, filenames in os.walk(artifact, followlinks=False):
        base = Path(dirpath)
        for name in filenames:
            rel = relpath(base / name, artifact)
            if rel != MANIFEST and rel not in listed and rel not in odd:
                problems.append((rel, "not listed in the manifest"))
        for name in dirnames:
            rel = relpath(base / name, artifact)
            if rel not in parents and rel not in odd:
                problems.append((rel + "/", "directory holds no file the manifest lists"))
    problems.extend(_disagreements(manifest, listed, outside))
    if check_inputs or checkpoint is not None:
        _verify_inputs(manifest, checkpoint, result)
    # Last: a name outside the artifact breaks the schema too, and the line the CLI prints
    # (the first problem) should say what it is.
    problems.extend((MANIFEST, f"schema: {err}") for err in schema_errors(manifest))
    return result


def _under_odd(rel: str, odd: dict) -> bool:
    return any(p.as_posix() in odd for p in Path(rel).parents)


def _disagreements(manifest: Mapping, listed: Mapping, outside: set[str]) -> list:
    """Where `graph.files` or a stage's outputs say something else than `outputs`."""
    out = []
    graph = manifest.get("graph")
    if isinstance(graph, dict):
        files = graph.get("files") if isinstance(graph.get("files"), dict) else {}
        for rel, digest in sorted(files.items()):
            if rel not in outside and listed.get(rel) != digest:
                out.append((rel, "graph.files disagrees with outputs"))
        onnx = graph.get("onnx")
        if onnx is not None and files and onnx not in files:
            out.append((str(onnx), "graph.onnx is not among graph.files"))
    records: list[tuple[str, dict]] = []
    stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
    order = [n for n in STAGE_ORDER if n in stages] + [n for n in stages if n not in STAGE_ORDER]
    for name in order:
        st = stages[name]
        if not isinstance(st, dict):
            continue
        if isinstance(st.get("outputs"), dict):
            records.append((name, st["outputs"]))
        profiles = st.get("profiles") if isinstance(st.get("profiles"), dict) else {}
        for p, rec in profiles.items():
            if isinstance(rec, dict) and isinstance(rec.get("outputs"), dict):
                records.append((f"{name}.{p}", rec["outputs"]))
    for i, (name, outputs) in enumerate(records):
        later = {rel for _, o in records[i + 1 :] for rel in o}
        for rel, digest in sorted(outputs.items()):
            if rel in outside:
                continue
            if rel not in listed:
                out.append((rel, f"stage {name} lists it but outputs does not"))
            elif listed[rel] != digest and rel not in later:
                out.append((rel, f"stage {name}'s sha256 disagrees with outputs"))
    return out


def _verify_inputs(manifest: Mapping, checkpoint: str | Path | None, result: VerifyResult) -> None:
    from dsc.paths import contained, hub_blobs

    src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    root = Path(checkpoint) if checkpoint is not None else Path(str(src.get("checkpoint", "")))
    if not root.is_dir():
        result.problems.append((str(root), "checkpoint directory not found"))
        return
    inputs = src.get("inputs") if isinstance(src.get("inputs"), dict) else {}
    for rel, digest in sorted(inputs.items()):
        try:
            path = contained(root, rel, what="checkpoint input", links_into=hub_blobs(root))
        except BadInput as e:
            result.problems.append((str(rel), f"not opened: {e}"))
            continue
        if not path.is_file():
            result.problems.append((str(path), "input missing"))
            continue
        result.inputs_checked += 1
        if sha256_file(path) != digest:
            result.problems.append((str(path), "input sha256 differs from the manifest"))


def raise_for_problems(result: VerifyResult) -> None:
    if result.ok:
        return
    first_file, first = result.problems[0]
    more = f" (+{len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
    raise CheckFailed(f"{result.artifact}: {first_file}: {first}{more}")


# --- inspect --------------------------------------------------------------------------------


def _mib(n: int | float | None) -> str:
    return "?" if n is None else f"{n / 2**20:,.1f} MiB"


def inspect_artifact(artifact: str | Path) -> dict:
    """A summary of an artifact: model, graph, stages, engines per profile, validation, files."""
    artifact = Path(artifact)
    m = load_manifest(artifact)
    sizes = {
        rel: (artifact / rel).stat().st_size
        for rel in m.get("outputs", {})
        if (artifact / rel).is_file()
    }
    stages = {}
    for name in STAGE_ORDER:
        st = m.get("stages", {}).get(name)
        if st is None:
            stages[name] = {"status": "absent"}
            continue
        entry = {"status": st.get("status", "ran")}
        for key in ("seconds", "reason", "scheme"):
            if key in st:
                entry[key] = st[key]
        if name == "compile":
            entry["profiles"] = {p: r.get("status") for p, r in st.get("profiles", {}).items()}
        stages[name] = entry
    profiles = {}
    for name, p in (m.get("profiles") or {}).items():
        eng = p.get("engine") or {}
        pre = p.get("preflight") or {}
        profiles[name] = {
            "status": p.get("status"),
            "sm": p.get("sm"),
            "engine": eng.get("path"),
            "engine_bytes": eng.get("size_bytes"),
            "backend": eng.get("backend"),
            "trt_version": eng.get("trt_version"),
            "preflight_sm": pre.get("sm"),
            "preflight_passed": pre.get("passed"),
            "device_command": p.get("device_command"),
            "envelope": p.get("envelope"),
        }
    return {
        "artifact": str(artifact),
        "format": m.get("format"),
        "schema_version": m.get("schema_version"),
        "created": m.get("created"),
        "command": m.get("command"),
        "precision": m.get("precision"),
        "source": {k: v for k, v in m.get("source", {}).items() if k != "inputs"}
        | {"input_files": len(m.get("source", {}).get("inputs", {}))},
        "graph": {k: v for k, v in (m.get("graph") or {}).items() if k != "files"},
        "tools": m.get("tools", {}),
        "stages": stages,
        "profiles": profiles,
        "validation": m.get("validation"),
        "files": len(m.get("outputs", {})),
        "bytes": sum(sizes.values()),
    }


def format_inspect(s: dict) -> str:
    src = s["source"]
    lines = [
        f"artifact {s['artifact']} ({s['format']} v{s['schema_version']}, written by "
        f"dsc {s.get('command') or '?'} at {s['created']})"
    ]
    params = src.get("num_parameters")
    size = f", {params / 1e6:,.1f}M parameters" if params else ""
    lines.append(
        f"model: {src.get('family')} ({src.get('architecture')}){size}, "
        f"from {src.get('checkpoint')} ({src.get('input_files')} input files hashed)"
    )
    g = s.get("graph") or {}
    if g:
        scheme = (s["stages"].get("quantize") or {}).get("scheme")
        quant = f" with {scheme} Q/DQ" if scheme else ""
        lines.append(f"graph: {g.get('onnx')} {g.get('dtype')}{quant}, opset {g.get('opset')}")
    lines.append("stages:")
    for name, st in s["stages"].items():
        status = st["status"].replace("_", " ")
        extra = f" ({st['reason']})" if st.get("reason") else ""
        secs = ""
        if isinstance(st.get("seconds"), (int, float)):
            secs = (
                f" (its run took {st['seconds']:.1f}s)"
                if st["status"] == "reused"
                else f" {st['seconds']:.1f}s"
            )
        if name == "compile" and st.get("profiles"):
            extra = " (" + ", ".join(f"{p}: {v}" for p, v in st["profiles"].items()) + ")"
        lines.append(f"  {name:<9} {status}{secs}{extra}")
    if s["profiles"]:
        lines.append("engines:")
        width = max(len(n) for n in s["profiles"])
        for name, p in s["profiles"].items():
            head = f"  {name:<{width}}  SM{p['sm']}"
            if p["engine"]:
                lines.append(
                    f"{head}  built: {p['engine']} ({_mib(p['engine_bytes'])}, "
                    f"{p['backend']} {p['trt_version']})"
                )
            else:
                verdict = "passed" if p["preflight_passed"] else "failed"
                lines.append(
                    f"{head}  NOT built here: preflight for SM{p['preflight_sm']} "
                    f"{verdict}; build it on the device: dsc compile ARTIFACT --profile "
                    f"{name} (or {p['device_command']})"
                )
    else:
        lines.append("engines: none (dsc compile ARTIFACT --profile P builds one)")
    v = s.get("validation")
    if v:
        verdict = "passed" if v.get("passed") else "FAILED"
        if v.get("status") == "skipped":
            verdict = f"skipped ({v.get('reason')})"
        lines.append(
            f"validation: {v.get('kind')} {verdict}" + (f" — {v['note']}" if v.get("note") else "")
        )
    lines.append(f"files: {s['files']} listed, {_mib(s['bytes'])}")
    tools = s.get("tools") or {}
    shown = ", ".join(f"{k} {v}" for k, v in tools.items() if v)
    lines.append(f"tools: {shown}")
    return "\n".join(lines)
