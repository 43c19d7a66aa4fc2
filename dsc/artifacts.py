"""Artifact directories: recognised, refused, and written atomically.

An artifact directory is built in a hidden temporary directory beside its destination and
renamed into place only when every file is written, so a failure or Ctrl-C leaves the
destination exactly as it was. dsc never writes into (or replaces) a directory that holds
anything other than a dsc artifact; replacing an artifact needs `force=True`.

The temporary directory is `.<name>.tmp-<pid>-<random>`: one left by a process that no longer
runs (killed with SIGKILL, or the machine went down) is removed by the next `atomic_dir` for the
same destination. Artifacts read as input are checked first (`load_manifest`, `load_io_spec`):
no symbolic links or special files inside, every name the manifest and `model_io.json` give stays
inside the directory (`dsc.paths.contained`), and so does the graph's external data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dsc import signals
from dsc.errors import BadInput, EnvironmentFailure, OutputConflict
from dsc.paths import (
    check_graph_file,
    check_tree,
    contained,
    manifest_paths,
    read_bounded,
    regular_file,
    remove_stale,
)

MANIFEST = "manifest.json"
IO_SPEC = "model_io.json"
# Weights go to `<graph>.data` beside the graph at or above this size: protobuf cannot hold a
# message over 2 GiB, and the graph itself needs room beside the weights.
EXTERNAL_DATA_THRESHOLD = 3 * 2**29  # 1.5 GiB
ARTIFACT_FORMAT = "dsc-artifact"
SCHEMA_VERSION = 1


def is_artifact(path: Path) -> bool:
    try:
        data = json.loads(read_bounded(Path(path) / MANIFEST, what=MANIFEST))
    except (OSError, ValueError, BadInput):
        return False
    return isinstance(data, dict) and data.get("format") == ARTIFACT_FORMAT


def check_output(path: Path, *, force: bool) -> None:
    """Refuse an output path that holds anything but a dsc artifact (or an artifact, unforced)."""
    path = Path(path)
    if not path.exists():
        for parent in path.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise EnvironmentFailure(
                        f"cannot create output path {path}: {parent} is a file, not a directory"
                    )
                break
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
        raise OutputConflict(
            f"output path {path} already holds a dsc artifact; pass --force to replace it"
        )


@contextlib.contextmanager
def atomic_dir(
    dest: Path, *, force: bool = False, moved_in: list[tuple[Path, Path]] | None = None
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dest` when the block finishes without error.

    `moved_in`: (original path, path inside the temporary directory) pairs of files the block
    moved in from elsewhere (`dsc quantize --move-input`) and appended to this list; when the
    block or the swap fails they are moved back before the temporary directory is removed."""
    dest = Path(dest).absolute()
    check_output(dest, force=force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    with signals.deferred():  # no temporary directory without the cleanup below
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    # mkdtemp makes the directory private (0700); the artifact gets the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        # A signal during the swap is delivered once it is done (the artifact is complete).
        with signals.deferred():
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    except BaseException:
        with signals.deferred():
            for original, inside in reversed(moved_in or ()):
                if inside.exists() and not original.exists():
                    os.replace(inside, original)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_manifest(artifact: Path, *, check: bool = True) -> dict:
    """The manifest of an artifact read as input.

    `check` (the default): refuse an artifact holding symbolic links or special files, or whose
    manifest names a file outside it (`dsc verify` passes False and reports these instead)."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise BadInput(f"artifact directory not found: {artifact}")
    if not is_artifact(artifact):
        raise BadInput(f"{artifact} is not a dsc artifact (no valid {MANIFEST})")
    manifest = json.loads(read_bounded(artifact / MANIFEST, what=MANIFEST))
    if check:
        check_tree(artifact)
        for where, name in manifest_paths(manifest):
            contained(artifact, name, what=f"{MANIFEST} {where}")
    return manifest


def load_io_spec(artifact: Path, *, check_manifest: bool = True) -> dict:
    """model_io.json of an artifact (`check_manifest=False`: of one still being written).

    Its `onnx` entry must name a regular file inside the artifact; with `check_manifest` the
    graph's external data is checked too (`dsc.paths.check_graph_file`)."""
    if check_manifest:
        load_manifest(artifact)
    try:
        io = json.loads(read_bounded(Path(artifact) / IO_SPEC, what=IO_SPEC))
    except (OSError, ValueError) as e:
        raise BadInput(f"artifact {artifact} has no valid {IO_SPEC}: {e}") from None
    if not isinstance(io, dict):
        raise BadInput(f"artifact {artifact} has no valid {IO_SPEC}: not a JSON object")
    onnx = regular_file(artifact, io.get("onnx"), what=f"{IO_SPEC}'s onnx")
    if check_manifest:
        check_graph_file(onnx)
    return io


def data_file(onnx_name: str) -> str:
    """The external-data file name dsc gives a graph: `model.onnx` -> `model.onnx.data`."""
    return f"{onnx_name}.data"


def is_external_data(rel: str) -> bool:
    """Whether an artifact file is an ONNX external-data file (never hard-linked: onnx and
    onnx-ir refuse a data file with more than one link)."""
    return rel.endswith(".onnx.data")


def weight_bytes(model) -> int:
    """Bytes of an onnx_ir model's initializers (external ones counted, not read)."""
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def write_graph(model, directory: Path, onnx_name: str, *, external: bool | None = None) -> bool:
    """Save an onnx_ir model as `directory/onnx_name`, its weights in `<onnx_name>.data` when
    `external` (None: when they reach `EXTERNAL_DATA_THRESHOLD`); returns whether they are.

    The files are written in a private directory and then renamed over the old ones, so tensors
    of `model` loaded lazily from the old data file read intact bytes while the new file is
    written (the old inode lives on until they are released). After this call those lazy
    tensors point at the new file, whose layout differs: do not use `model` again; reload it.
    A data file left from an earlier save is removed when the new graph has none.
    """
    import onnx_ir as ir

    directory = Path(directory)
    if external is None:
        external = weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data = data_file(onnx_name)
    if not external:
        # Tensors still external would be saved as references to a file this call removes.
        ir.external_data.load_to_model(model)
    stage = Path(tempfile.mkdtemp(prefix=".graph-", dir=directory))
    old = external_tensors(model)
    try:
        ir.save(model, stage / onnx_name, external_data=data if external else None)
        if external:
            os.replace(stage / data, directory / data)
        elif (directory / data).exists():
            (directory / data).unlink()
        os.replace(stage / onnx_name, directory / onnx_name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    # The old tensors' memory maps keep the replaced data file on disk (and its pages in the
    # resident set) for as long as anything references `model`: onnxscript's pattern matchers
    # keep the last graph they matched, so at 7B the 15 GB export data outlived the optimize
    # stage and the build ran out of disk. Close them; `model` is not to be used again.
    for tensor in old:
        tensor.release()
    return external


def external_tensors(model) -> list:
    """The `onnx_ir.ExternalTensor`s `model`'s initializers read, in every graph, and those the
    lazily derived tensors among them read (any tensor with `source_tensors`: the passes'
    `DerivedTensor`), each once."""
    import onnx_ir as ir

    seen: set[int] = set()
    stack = [v.const_value for g in model.graphs() for v in g.initializers.values()]
    found = []
    while stack:
        t = stack.pop()
        if isinstance(t, ir.Value):
            t = t.const_value
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, ir.ExternalTensor):
            found.append(t)
        stack.extend(getattr(t, "source_tensors", ()))
    return found


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
