"""Artifact directories: recognised, refused, and written atomically.

An artifact directory is built in a hidden temporary directory beside its destination and
renamed into place only when every file is written, so a failure or Ctrl-C leaves the
destination exactly as it was. dsc never writes into (or replaces) a directory that holds
anything other than a dsc artifact; replacing an artifact needs `force=True`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsc.errors import BadInput, OutputConflict

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IO_SPEC = "model_io.json"
ARTIFACT_FORMAT = "dsc-artifact"
SCHEMA_VERSION = 1


def is_artifact(path: Path) -> bool:
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == ARTIFACT_FORMAT


def check_output(path: Path, *, force: bool) -> None:
    """Refuse an output path that holds anything but a dsc artifact (or an artifact, unforced)."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_file() or path.is_symlink():
        raise OutputConflict(f"output path {path} is a file, not a directory")
    if not any(path.iterdir()):
        return
    if not is_artifact(path):
        raise OutputConflict(
            f"output path {path} is not empty and is not a dsc artifact; choose another path"
        )
    if not force:
        raise OutputConflict(f"output path {path} already holds a dsc artifact; pass --force to replace it")


@contextlib.contextmanager
def atomic_dir(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dest` when the block finishes without error."""
    dest = Path(dest).absolute()
    check_output(dest, force=force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    # mkdtemp makes the directory private (0700); the artifact gets the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_manifest(artifact: Path) -> dict:
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise BadInput(f"artifact directory not found: {artifact}")
    if not is_artifact(artifact):
        raise BadInput(f"{artifact} is not a dsc artifact (no valid {MANIFEST})")
    return json.loads((artifact / MANIFEST).read_text())


def load_io_spec(artifact: Path, *, check_manifest: bool = True) -> dict:
    """model_io.json of an artifact (`check_manifest=False`: of one still being written)."""
    if check_manifest:
        load_manifest(artifact)
    try:
        return json.loads((Path(artifact) / IO_SPEC).read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"artifact {artifact} has no valid {IO_SPEC}: {e}") from None


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
