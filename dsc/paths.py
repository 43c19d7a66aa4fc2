"""Paths dsc takes from files stay inside the directory they describe; reads are bounded.

Checkpoints and artifacts name files inside themselves: shards in `model.safetensors.index.json`,
the graph in `model_io.json`, every output in `manifest.json`, external-data locations inside
`model.onnx`. Each such name goes through `contained(root, name)` before anything reads or writes
it: an absolute name, a `..` component, or a symbolic link anywhere on the way from `root` is a
`BadInput` (exit 3), so no file outside `root` is opened, hashed, copied, replaced or deleted
because a file said so. Links are refused rather than followed (a link inside the directory can
point anywhere, and `ln -s /etc/passwd ck/merges.txt` would otherwise ship the file).

One layout of links is accepted for checkpoints: the Hugging Face hub cache, where every file
of `snapshots/<revision>/` links into the repository's `blobs/` (`hub_blobs`).

Inputs that could be endless (`/dev/zero`, a FIFO, a multi-gigabyte "config") are read with
`read_bounded`: regular files only, up to a size limit.

`remove_stale` clears what an interrupted `dsc.artifacts.atomic_dir` of a process that no longer
runs left beside its destination (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>`).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from dsc.errors import BadInput

logger = logging.getLogger(__name__)

MiB = 2**20
# Largest text file dsc reads whole, by kind (a real tokenizer.json is 7-11 MB).
LIMITS = {"json": 64 * MiB, "yaml": 4 * MiB, "text": 1024 * MiB}


class Escapes(BadInput):
    """A name that leads outside its directory, or through a symbolic link."""


def unsafe_name(name: object) -> str | None:
    """Why `name` cannot name a file inside a directory (None: it can)."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\0" in name:
        return "holds a NUL byte"
    for p in (PurePosixPath(name), PureWindowsPath(name)):
        if p.is_absolute() or p.drive or p.root:
            return "is an absolute path"
        if ".." in p.parts:
            return "leads outside the directory (..)"
    return None


def hub_blobs(root: Path) -> Path | None:
    """`<repo>/blobs` when `root` is a Hugging Face cache snapshot (`<repo>/snapshots/<rev>`)."""
    root = Path(root).absolute()
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent / "blobs"
    return None


def contained(
    root: str | Path, name: object, *, what: str = "file", links_into: Path | None = None
) -> Path:
    """`root / name`, checked: a relative name without `..`, no symbolic link on the way.

    `links_into`: a directory a link may point into (the hub cache's blobs). Does not require
    the file to exist; `regular_file` does."""
    root = Path(root)
    why = unsafe_name(name)
    if why is not None:
        raise Escapes(
            f"{what} {name!r} in {root} {why}; dsc only reads and writes files inside {root}"
        )
    path = root
    for part in PurePosixPath(str(name).replace("\\", "/")).parts:
        path = path / part
        if path.is_symlink():
            if links_into is not None and _links_into(path, links_into):
                continue
            raise Escapes(
                f"{what} {path} is a symbolic link; dsc does not follow links in "
                f"{root} (copy the file there instead)"
            )
    return path


def _links_into(link: Path, directory: Path) -> bool:
    try:
        target = link.resolve(strict=True)
        return target.is_file() and target.is_relative_to(directory.resolve(strict=True))
    except (OSError, RuntimeError):
        return False


def regular_file(
    root: str | Path, name: object, *, what: str = "file", links_into: Path | None = None
) -> Path:
    """`contained`, and the path must be a regular file (not a FIFO, device or directory)."""
    path = contained(root, name, what=what, links_into=links_into)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BadInput(f"{what} {path} is missing") from None
    except OSError as e:
        raise BadInput(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise BadInput(f"{what} {path} is not a regular file")
    return path


def read_bounded(
    path: str | Path, *, what: str = "file", kind: str = "json", limit: int | None = None
) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (default by `kind`).

    A FIFO, a device (`/dev/zero`), a directory or an oversized file is a `BadInput` before
    anything is read."""
    path = Path(path)
    limit = LIMITS[kind] if limit is None else limit
    try:
        with open(path, "rb", opener=_nonblocking) as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BadInput(f"{what} {path} is not a regular file")
            if st.st_size > limit:
                raise BadInput(
                    f"{what} {path} is {st.st_size / MiB:,.1f} MiB; dsc reads at most "
                    f"{limit / MiB:,.0f} MiB there"
                )
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise BadInput(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise BadInput(f"{what} {path} is a directory, not a file") from None
    if len(data) > limit:  # grew while read
        raise BadInput(f"{what} {path} is larger than {limit / MiB:,.0f} MiB")
    return data


def read_text_bounded(
    path: str | Path,
    *,
    what: str = "file",
    kind: str = "json",
    limit: int | None = None,
    errors: str = "strict",
) -> str:
    data = read_bounded(path, what=what, kind=kind, limit=limit)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _nonblocking(path, flags):
    # Opening a FIFO for reading blocks until a writer appears: open without blocking, then
    # fstat refuses it.
    return os.open(path, flags | os.O_NONBLOCK)


def odd_entries(root: str | Path) -> list[tuple[str, str]]:
    """(relative path, what it is) of every symbolic link and non-regular file under `root`,
    found without following links."""
    root = Path(root)
    out: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            try:
                mode = p.lstat().st_mode
            except OSError:
                continue
            if stat.S_ISLNK(mode):
                out.append((rel, "is a symbolic link"))
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                out.append((rel, "is not a regular file"))
    return sorted(out)


def check_tree(root: str | Path, what: str = "artifact") -> None:
    """Refuse a directory holding symbolic links or special files (FIFOs, devices, sockets)."""
    odd = odd_entries(root)
    if odd:
        rel, why = odd[0]
        more = f" (+{len(odd) - 1} more)" if len(odd) > 1 else ""
        raise Escapes(
            f"{what} {root}: {rel} {why}{more}; dsc does not follow links or read "
            "special files in an artifact"
        )


def external_data_locations(onnx_path: str | Path) -> list[str]:
    """Every external-data `location` an ONNX file names (the graph is parsed, no weight read)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{onnx_path} is not a readable ONNX model: {first}") from None
    out = []
    for t in _get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            out.append(entries.get("location", ""))
    return out


def check_graph_file(onnx_path: str | Path) -> Path:
    """Refuse an ONNX file whose external data lives outside its directory, behind a link, or in
    something other than a regular file: checked before ONNX Runtime, onnx_ir or TensorRT open
    it (each resolves locations against the graph's directory, or the current one)."""
    onnx_path = Path(onnx_path)
    root = onnx_path.parent
    for location in sorted(set(external_data_locations(onnx_path))):
        regular_file(root, location, what=f"external data of {onnx_path.name}")
    return onnx_path


# --- names a manifest gives ----------------------------------------------------------------


def manifest_paths(manifest: dict) -> list[tuple[str, object]]:
    """(where, name) of every file name a manifest gives: outputs, graph, stage outputs."""
    out: list[tuple[str, object]] = []

    def names(where: str, mapping) -> None:
        if isinstance(mapping, dict):
            out.extend((where, k) for k in mapping)

    names("outputs", manifest.get("outputs"))
    graph = manifest.get("graph")
    if isinstance(graph, dict):
        if "onnx" in graph:
            out.append(("graph.onnx", graph["onnx"]))
        names("graph.files", graph.get("files"))
    stages = manifest.get("stages")
    for name, st in stages.items() if isinstance(stages, dict) else ():
        if not isinstance(st, dict):
            continue
        names(f"stages.{name}.outputs", st.get("outputs"))
        profiles = st.get("profiles")
        for p, rec in profiles.items() if isinstance(profiles, dict) else ():
            if isinstance(rec, dict):
                names(f"stages.{name}.profiles.{p}.outputs", rec.get("outputs"))
    return out


# --- leftovers of interrupted writes -------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def remove_stale(dest: Path) -> list[Path]:
    """Remove `atomic_dir` leftovers of `dest` whose process is gone; returns what was removed.

    `.<name>.tmp-<pid>-*` is deleted; `.<name>.old-<pid>` (the previous artifact, moved aside
    for the swap) is put back when `dest` is missing, else deleted."""
    dest = Path(dest)
    removed = []
    for p in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*")):
        kind, _, rest = p.name[len(dest.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.is_symlink() or not p.is_dir():
            continue
        if kind == "old" and not dest.exists() and not dest.is_symlink():
            os.replace(p, dest)
            logger.info("restored %s from %s, left by process %s", dest, p.name, pid)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        logger.info("removed %s, left by process %s", p, pid)
    return removed


def cache_dir(name: str) -> Path:
    """`$DSC_CACHE_DIR/<name>` (default `~/.cache/dsc/<name>`): where dsc keeps one kind of
    cache (`trace`, `calibration`, `sha256`)."""
    return Path(os.environ.get("DSC_CACHE_DIR") or Path.home() / ".cache" / "dsc") / name


def cache_switch(variable: str) -> bool:
    """Whether the environment variable `variable` leaves a cache on (default on; "0",
    "false", "no" or "off" turn it off)."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")
