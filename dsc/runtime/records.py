"""An engine built outside `dsc build` / `dsc compile` (the GPU checks', the stand-in's),
recorded in the artifact's manifest as the builder records one."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from dsc import signals
from dsc.artifacts import MANIFEST, load_io_spec, load_manifest
from dsc.models.checkpoint import sha256_file


def record_engine(
    artifact: Path,
    profile: str,
    rel: str,
    envelope,
    *,
    backend: str,
    trt_version: str,
    sm: int,
    runtime: str,
    build_seconds: float = 0.0,
    profile_name: str | None = None,
    note: str | None = None,
) -> dict:
    """Record an engine file already at `artifact/rel` as `profiles.<profile>` in manifest.json
    (the builder's record shape; `plan` left empty with `note`), atomically. For engines built
    outside `dsc build` / `dsc compile`: the GPU checks' and the stand-in's."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    path = artifact / rel
    note = note or "engine recorded by dsc.runtime.records.record_engine; no plan was made"
    env = asdict(envelope)
    record = {
        "status": "built",
        "sm": sm,
        "envelope": env,
        "profile": {
            "name": profile_name or profile,
            "compute_capability": sm,
            "precisions": [],
            "builder": {},
            "envelope": env,
        },
        "options": {},
        "plan": {
            "fits": True,
            "precision": io.get("dtype"),
            "total_bytes": 0,
            "capacity_bytes": 0,
            "note": note,
        },
        "engine": {
            "path": rel,
            "sha256": sha256_file(path),
            "size_bytes": path.stat().st_size,
            "backend": backend,
            "trt_version": trt_version,
            "target_sm": sm,
            "build_seconds": round(build_seconds, 3),
            "runtime": runtime,
        },
        "preflight": None,
        "device_command": None,
        "notes": [note],
    }
    manifest.setdefault("profiles", {})[profile] = record
    manifest.setdefault("outputs", {})[rel] = record["engine"]["sha256"]
    with signals.deferred():
        tmp = artifact / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, artifact / MANIFEST)
    return record
