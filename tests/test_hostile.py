"""Hostile input: every command, fed what a hostile or careless user would feed it.

Each case of `CASES` builds its inputs in a fresh directory, runs `dsc` in-process and asserts:

- the documented exit code, never 70 ("a bug in dsc");
- one stderr line, `dsc: error: ...` (progress lines may come first only for cases marked
  `late`, whose error is found while weights are read); no Python warning, no traceback, no
  transformers load report, no "see the above report";
- nothing changed, appeared or disappeared in the case's directory (the output path included:
  a refusal leaves it as it was, and no `.OUT.tmp-*` behind);
- for containment cases, the file outside the input that a name, link or location points at
  was neither opened (an audit hook on `open`, and its access time, set older than its
  modification time so that a read under relatime moves it) nor changed.

The signal cases run `dsc` in a subprocess and stop it with SIGINT or SIGTERM mid-stage (a
stage made to wait, and a real TensorRT-RTX compile); the stale-temp case leaves a dead
process's temporary directory beside the output path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

# --- detectors ----------------------------------------------------------------------------------

_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _WATCHED or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError, OSError):
            return
        if real in _WATCHED:
            _OPENED.append(real)


sys.addaudithook(_audit)  # permanent (audit hooks cannot be removed); idle while _WATCHED is empty


def _atime_detects_reads(directory: Path) -> bool:
    """Whether this file system moves atime on a read when atime < mtime (relatime, strictatime)."""
    probe = directory / ".atime-probe"
    probe.write_bytes(b"x")
    st = probe.stat()
    os.utime(probe, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    probe.read_bytes()
    moved = probe.stat().st_atime_ns != st.st_mtime_ns - 10**12
    probe.unlink()
    return moved


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): kind, size, mtime and a content hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = (
                    "file",
                    st.st_size,
                    st.st_mtime_ns,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("other", st.st_mode)
    return out


# --- building inputs ----------------------------------------------------------------------------


class Ctx:
    """A case's directory: inputs under in/, files an input may point at under outside/."""

    def __init__(self, root: Path, checkpoints: dict, exported: dict, monkeypatch):
        self.root = root
        self._checkpoints = checkpoints
        self._exported = exported
        self.monkeypatch = monkeypatch
        self.out = root / "out"
        self.outside = root / "outside"
        self.outside.mkdir()
        self.victims: list[Path] = []

    def ckpt(self, family: str = "llama") -> Path:
        dst = self.root / "in" / "ck"
        shutil.copytree(self._checkpoints[family], dst)
        return dst

    def art(self) -> Path:
        dst = self.root / "in" / "art"
        shutil.copytree(self._exported["llama"], dst)
        return dst

    def victim(self, name: str = "victim.txt", data: bytes = b"root:x:0:0:secret\n") -> Path:
        """A file outside every input that dsc must neither read nor change."""
        p = self.outside / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self.victims.append(p)
        return p

    def fifo(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        os.mkfifo(path)
        return path

    def link(self, path: Path, target: Path | str) -> Path:
        if path.exists() or path.is_symlink():
            path.unlink()
        path.symlink_to(target)
        return path


def edit_json(path: Path, change: Callable[[dict], object]) -> Path:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))
    return path


def config(**fields) -> Callable[[dict], None]:
    return lambda cfg: cfg.update(fields)


def edit_tensors(ckpt: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    for f in sorted(ckpt.glob("*.safetensors")):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})


def write_header(path: Path, header) -> None:
    """Replace a safetensors file's header (its data stays)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    body = data[8 + n :]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    write_header(path, header)


def first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def sharded(c: Ctx, shard: str) -> Path:
    """A two-shard checkpoint whose index names `shard` for one tensor."""
    from dsc.fixtures import write_sharded

    ck = write_sharded(c._checkpoints["llama"], c.root / "in" / "ck")
    index = ck / "model.safetensors.index.json"
    edit_json(index, lambda d: d["weight_map"].update({next(iter(d["weight_map"])): shard}))
    return ck


def rehash(art: Path) -> None:
    """What a tamperer does after editing files: make the manifest agree with them again."""
    from dsc.manifest import canonical_hash, hash_tree

    m = json.loads((art / "manifest.json").read_text())
    files = hash_tree(art)
    m["outputs"] = files
    m["graph"]["files"] = {k: files[k] for k in m["graph"]["files"] if k in files}
    m["graph"]["hash"] = canonical_hash(m["graph"]["files"])
    for st in m["stages"].values():
        st["outputs"] = {k: files[k] for k in st.get("outputs", {}) if k in files}
    (art / "manifest.json").write_text(json.dumps(m, indent=2))


def io_onnx(art: Path, value) -> None:
    edit_json(art / "model_io.json", lambda d: d.update(onnx=value))


def victim_graph(c: Ctx, art: Path) -> Path:
    """A real graph outside the artifact (what `onnx: ../victim/model.onnx` would reach)."""
    v = c.outside / "victim" / "model.onnx"
    v.parent.mkdir(parents=True)
    shutil.copy2(art / "model.onnx", v)
    c.victims.append(v)
    return v


def external(c: Ctx, art: Path, location: str, *, link: bool = False) -> Path:
    """Move the largest initializer of the artifact's graph to external data at `location`
    (relative to the graph), whose bytes live outside the artifact: a readable attack."""
    import onnx
    from onnx.external_data_helper import set_external_data

    m = onnx.load(str(art / "model.onnx"))
    t = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    data = bytes(t.raw_data)
    target = c.victim("weights.bin", data)
    set_external_data(t, location=location, offset=0, length=len(data))
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(m, str(art / "model.onnx"))
    if link:
        c.link(art / location, target)
    return target


def enospc(c: Ctx) -> None:
    import dsc.export.onnx_export as ex

    def full(info, out_dir, **kw):
        (out_dir / "model.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir / "model.onnx"))

    c.monkeypatch.setattr(ex, "export_graph", full)


def library_full(c: Ctx) -> None:
    """A library that reports ENOSPC in its own exception, without the OSError."""
    import dsc.export.onnx_export as ex

    def full(info, out_dir, **kw):
        raise RuntimeError(
            f"[enforce fail at inline_container.cc:603] . unexpected pos 64 vs "
            f"0: {os.strerror(errno.ENOSPC)}"
        )

    c.monkeypatch.setattr(ex, "export_graph", full)


def numpy_short_write(c: Ctx) -> None:
    """numpy's `tofile` (what onnx_ir's data-file writer calls) on a full disk: an OSError with
    no errno, "N requested and 0 written". /dev/full fails every write with ENOSPC."""
    import numpy as np

    import dsc.export.onnx_export as ex

    def full(info, out_dir, **kw):
        with open("/dev/full", "wb") as f:
            np.zeros(1 << 16, np.uint8).tofile(f)

    c.monkeypatch.setattr(ex, "export_graph", full)


def numpy_fallocate_full(c: Ctx) -> None:
    """numpy's `tofile` when its fallocate of the bytes to come fails with ENOSPC (a real
    filesystem that supports fallocate, unlike /dev/full and tmpfs here): an OSError with no
    errno, "Not enough free space to write N bytes after offset M" (numpy's convert.c,
    `npy_fallocate`). Seen in `dsc optimize` of DeepSeek-V2-Lite on a full disk; the text is
    raised as numpy raises it."""
    import dsc.export.onnx_export as ex

    def full(info, out_dir, **kw):
        raise OSError("Not enough free space to write 369098752 bytes after offset 20090955776")

    c.monkeypatch.setattr(ex, "export_graph", full)


def refused_by_os(code: int):
    def patch(c: Ctx) -> None:
        import dsc.artifacts as artifacts

        def refuse(*a, dir=None, **kw):
            raise OSError(code, os.strerror(code), str(dir))

        c.monkeypatch.setattr(artifacts.tempfile, "mkdtemp", refuse)

    return patch


def profile_named(c: Ctx, name: str) -> Path:
    from dsc.hardware import resolve_name

    text = resolve_name("rtx-4090").read_text()
    p = c.root / "in" / "evil.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(
        "\n".join(
            f"name: {json.dumps(name)}" if ln.startswith("name:") else ln
            for ln in text.splitlines()
        )
        + "\n"
    )
    return p


# --- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Ctx], list[str]]
    code: int
    needle: str = ""  # a piece of the error line
    late: bool = False  # found while weights are read: progress lines may precede the error
    contained: bool = False  # a name/link/location points at a victim outside the input


def _export(c: Ctx, ck: Path, *extra: str) -> list[str]:
    return ["export", str(ck), "-o", str(c.out), *extra]


def _build(c: Ctx, ck: Path, *extra: str) -> list[str]:
    return ["build", str(ck), "-o", str(c.out), "--profile", "rtx-4090", *extra]


def _ck(edit: Callable[[Ctx, Path], object], make: Callable[..., list[str]] = _export):
    """A copy of the llama checkpoint, edited, handed to `make` (export or build)."""

    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        edit(c, ck)
        return make(c, ck)

    return setup


def _cfg(**fields):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        edit_json(ck / "config.json", config(**fields))
        return _export(c, ck)

    return setup


def _plan_cfg(**fields):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        edit_json(ck / "config.json", config(**fields))
        return ["plan", str(ck / "config.json"), "--profile", "rtx-4090"]

    return setup


def _header(change):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        edit_header(ck / "model.safetensors", change)
        return _export(c, ck)

    return setup


def _ck_link(name: str):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        v = c.victim(name, (ck / name).read_bytes() if (ck / name).exists() else b"x\n")
        c.link(ck / name, v)
        return _export(c, ck)

    return setup


def _art_then(make_argv: Callable[[Ctx, Path], list[str]], tamper: Callable[[Ctx, Path], None]):
    def setup(c: Ctx) -> list[str]:
        art = c.art()
        tamper(c, art)
        return make_argv(c, art)

    return setup


def _opt(c: Ctx, art: Path) -> list[str]:
    return ["optimize", str(art), "-o", str(c.out)]


def _quant(c: Ctx, art: Path) -> list[str]:
    return ["quantize", str(art), "-o", str(c.out), "--int8"]


def _run(c: Ctx, art: Path) -> list[str]:
    return ["run", str(art), "--prompt", "In the beginning", "--max-new-tokens", "2"]


def _validate(c: Ctx, art: Path) -> list[str]:
    return ["validate", str(art), "--windows", "1", "--prompts", "1", "--gen-len", "2"]


def _bench(c: Ctx, art: Path) -> list[str]:
    return ["bench", str(art), "--prompt-len", "4", "--gen-len", "2", "--repeats", "1"]


def _compile(c: Ctx, art: Path) -> list[str]:
    return ["compile", str(art), "--profile", "rtx-4090"]


def _verify(c: Ctx, art: Path) -> list[str]:
    return ["verify", str(art)]


def _dotdot(c: Ctx, art: Path) -> None:
    victim_graph(c, art)
    io_onnx(art, "../../outside/victim/model.onnx")


def _absolute(c: Ctx, art: Path) -> None:
    io_onnx(art, str(victim_graph(c, art)))


def _graph_link(c: Ctx, art: Path) -> None:
    c.link(art / "model.onnx", victim_graph(c, art))


def _side_link(c: Ctx, art: Path) -> None:
    c.link(art / "merges.txt", c.victim("passwd"))


def _ext_dotdot(c: Ctx, art: Path) -> None:
    external(c, art, "../../outside/weights.bin")


def _ext_link(c: Ctx, art: Path) -> None:
    external(c, art, "model.onnx.data", link=True)


def _ext_dotdot_rehashed(c: Ctx, art: Path) -> None:
    external(c, art, "../../outside/weights.bin")
    rehash(art)


def _manifest_outputs(name_of: Callable[[Ctx], str]):
    def tamper(c: Ctx, art: Path) -> None:
        v = c.victim("passwd")
        digest = hashlib.sha256(v.read_bytes()).hexdigest()
        edit_json(art / "manifest.json", lambda m: m["outputs"].update({name_of(c): digest}))

    return tamper


def _stage_output_outside(c: Ctx, art: Path) -> None:
    v = c.victim("passwd")
    digest = hashlib.sha256(v.read_bytes()).hexdigest()
    edit_json(
        art / "manifest.json",
        lambda m: m["stages"]["export"]["outputs"].update({"../../outside/passwd": digest}),
    )


def _listed_link(c: Ctx, art: Path) -> None:
    v = c.victim("passwd")
    c.link(art / "merges.txt", v)
    digest = hashlib.sha256(v.read_bytes()).hexdigest()
    edit_json(art / "manifest.json", lambda m: m["outputs"].update({"merges.txt": digest}))


def _inputs_outside(c: Ctx) -> list[str]:
    art = c.art()
    ck = c.ckpt()
    v = c.victim("passwd")
    digest = hashlib.sha256(v.read_bytes()).hexdigest()
    edit_json(
        art / "manifest.json",
        lambda m: m["source"]["inputs"].update({"../../outside/passwd": digest}),
    )
    return ["verify", str(art), "--checkpoint", str(ck)]


def _tampered_out(c: Ctx) -> list[str]:
    """OUT holds an artifact of this checkpoint whose export stage claims a file outside it,
    with that file's real hash: reusing the stage would hash it and link it into the new one."""
    ck = c.ckpt()
    from dsc import api

    api.export(ck, c.out, dtype="fp16", progress=lambda m: None)
    v = c.victim("passwd")
    digest = hashlib.sha256(v.read_bytes()).hexdigest()
    edit_json(
        c.out / "manifest.json",
        lambda m: m["stages"]["export"]["outputs"].update({"../outside/passwd": digest}),
    )
    return ["build", str(ck), "-o", str(c.out), "--profile", "rtx-4090"]


def _drop_tensor(name: str):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        edit_tensors(ck, lambda t: t.pop(name))
        return _export(c, ck)

    return setup


def _tensor_edit(edit):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        edit_tensors(ck, edit)
        return _export(c, ck)

    return setup


def _extra_tensor(t):
    import torch

    t["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(4, 4)


def _nan_tensor(t):
    x = t["model.layers.1.input_layernorm.weight"].clone()
    x[0] = float("nan")
    t["model.layers.1.input_layernorm.weight"] = x


def _pickle_only(c: Ctx) -> list[str]:
    ck = c.ckpt()
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    return _export(c, ck)


def _file_at(rel: str, data: bytes):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        (ck / rel).write_bytes(data)
        return _export(c, ck)

    return setup


def _out_under_file(make: Callable[[Ctx], list[str]]):
    def setup(c: Ctx) -> list[str]:
        argv = make(c)
        blocker = c.root / "blocker"
        blocker.write_text("a file\n")
        c.out = blocker / "out"
        return [str(c.out) if a == str(c.root / "out") else a for a in argv]

    return setup


def _calib(path_of: Callable[[Ctx], Path], command: str = "build"):
    def setup(c: Ctx) -> list[str]:
        if command == "build":
            return _build(c, c.ckpt(), "--int8", "--calib", str(path_of(c)))
        return ["quantize", str(c.art()), "-o", str(c.out), "--int8", "--calib", str(path_of(c))]

    return setup


def _yaml(text: str, *extra: str):
    def setup(c: Ctx) -> list[str]:
        ck = c.ckpt()
        cfg = c.root / "in" / "dsc.yaml"
        cfg.write_text(text)
        return _build(c, ck, "--config", str(cfg), *extra)

    return setup


def _fifo_in_art(make_argv):
    def setup(c: Ctx) -> list[str]:
        art = c.art()
        c.fifo(art / "notes.txt")
        return make_argv(c, art)

    return setup


CASES: list[Case] = [
    # export: the checkpoint directory and config.json
    Case("export-missing-dir", lambda c: _export(c, c.root / "nope"), 3, "not found"),
    Case(
        "export-checkpoint-is-a-file",
        lambda c: _export(c, c.victim("file", b"x")),
        3,
        "must be a directory",
    ),
    Case(
        "export-config-not-json",
        _file_at("config.json", b'{"architectures": '),
        3,
        "invalid config.json",
    ),
    Case("export-config-a-list", _file_at("config.json", b"[1, 2]"), 3, "not a JSON object"),
    Case(
        "export-config-fifo", _ck(lambda c, ck: c.fifo(ck / "config.json")), 3, "not a regular file"
    ),
    Case(
        "export-config-links-to-dev-zero",
        _ck(lambda c, ck: c.link(ck / "config.json", "/dev/zero")),
        3,
        "symbolic link",
    ),
    Case(
        "export-config-links-outside", _ck_link("config.json"), 3, "symbolic link", contained=True
    ),
    Case("export-hidden-size-string", _cfg(hidden_size="abc"), 3, "'hidden_size' must be an"),
    Case("export-vocab-size-zero", _cfg(vocab_size=0), 3, "'vocab_size' must be in"),
    Case("export-layers-negative", _cfg(num_hidden_layers=-1), 3, "'num_hidden_layers'"),
    Case("export-layers-absurd", _cfg(num_hidden_layers=10**9), 3, "'num_hidden_layers'"),
    Case(
        "export-layers-beyond-tensors",
        _cfg(num_hidden_layers=3),
        3,
        "holds tensors of 2 decoder layer(s)",
    ),
    Case(
        "export-layers-fewer-than-tensors", _cfg(num_hidden_layers=1), 3, "holds tensors of layer 1"
    ),
    Case("export-heads-zero", _cfg(num_attention_heads=0), 3, "'num_attention_heads'"),
    Case(
        "export-heads-do-not-divide-hidden",
        _cfg(num_attention_heads=7, num_key_value_heads=7),
        3,
        "not a multiple",
    ),
    Case("export-eps-string", _cfg(rms_norm_eps="tiny"), 3, "'rms_norm_eps'"),
    Case(
        "export-vocab-disagrees-with-embedding",
        _cfg(vocab_size=600),
        3,
        "model.embed_tokens.weight is [512, 64]",
    ),
    Case(
        "export-unsupported-architecture",
        _cfg(architectures=["GPT2LMHeadModel"]),
        4,
        "GPT2LMHeadModel",
    ),
    Case("export-gptq-checkpoint", _cfg(quantization_config={"quant_method": "gptq"}), 4, "gptq"),
    # export: safetensors headers and shards
    Case(
        "export-header-not-an-object",
        lambda c: (write_header((ck := c.ckpt()) / "model.safetensors", [1, 2]), _export(c, ck))[1],
        3,
        "not a JSON object",
    ),
    Case(
        "export-header-float-offsets",
        _header(lambda h: first_tensor(h).update(data_offsets=[0.0, 4.5])),
        3,
        "data_offsets",
    ),
    Case(
        "export-header-negative-dims",
        _header(lambda h: first_tensor(h).update(shape=[-64, -8])),
        3,
        "non-negative",
    ),
    Case(
        "export-header-length-absurd",
        lambda c: (
            (f := (ck := c.ckpt()) / "model.safetensors").write_bytes(
                struct.pack("<Q", 2**62) + f.read_bytes()[8:]
            ),
            _export(c, ck),
        )[1],
        3,
        "exceeds the file",
    ),
    Case(
        "export-truncated-shard",
        lambda c: (
            (f := (ck := c.ckpt()) / "model.safetensors").write_bytes(f.read_bytes()[:-999]),
            _export(c, ck),
        )[1],
        3,
        "truncated",
    ),
    Case(
        "export-index-shard-dotdot",
        lambda c: (
            c.victim("outside.safetensors"),
            _export(c, sharded(c, "../../outside/outside.safetensors")),
        )[1],
        3,
        "outside the checkpoint directory",
        contained=True,
    ),
    Case(
        "export-index-shard-absolute",
        lambda c: _export(c, sharded(c, str(c.victim("abs.safetensors")))),
        3,
        "outside the checkpoint directory",
        contained=True,
    ),
    Case(
        "export-index-shard-link",
        lambda c: (
            ck := sharded(c, "model-00001-of-00002.safetensors"),
            c.link(
                ck / "model-00002-of-00002.safetensors",
                c.victim("s2", (ck / "model-00002-of-00002.safetensors").read_bytes()),
            ),
            _export(c, ck),
        )[2],
        3,
        "symbolic link",
        contained=True,
    ),
    Case("export-weights-link", _ck_link("model.safetensors"), 3, "symbolic link", contained=True),
    Case(
        "export-merges-links-to-passwd", _ck_link("merges.txt"), 3, "symbolic link", contained=True
    ),
    Case("export-tokenizer-link", _ck_link("tokenizer.json"), 3, "symbolic link", contained=True),
    Case(
        "export-tokenizer-garbage",
        _file_at("tokenizer.json", b'{"model": 42}'),
        3,
        "tokenizer.json",
    ),
    Case(
        "export-tokenizer-config-garbage",
        _file_at("tokenizer_config.json", b"[[["),
        3,
        "tokenizer_config.json",
    ),
    Case(
        "export-no-tokenizer",
        lambda c: ((ck := c.ckpt()).joinpath("tokenizer.json").unlink(), _export(c, ck))[1],
        3,
        "no tokenizer",
    ),
    Case("export-pickle-only", _pickle_only, 3, "--allow-pickle"),
    # export: tensors (found while the weights are read)
    Case(
        "export-missing-tensor",
        _drop_tensor("model.layers.1.mlp.up_proj.weight"),
        3,
        "lacks 1 tensor (model.layers.1.mlp.up_proj.weight)",
        late=True,
    ),
    Case(
        "export-unexpected-tensor",
        _tensor_edit(_extra_tensor),
        3,
        "model.layers.0.self_attn.extra_proj.weight",
        late=True,
    ),
    Case("export-nan-tensor", _tensor_edit(_nan_tensor), 3, "NaN", late=True),
    # export: options and the output path
    Case("export-opset-5", lambda c: _export(c, c.ckpt(), "--opset", "5"), 2, "opset 5"),
    Case("export-dtype-int3", lambda c: _export(c, c.ckpt(), "--dtype", "int3"), 2, "--dtype"),
    Case("export-no-output", lambda c: ["export", str(c.ckpt())], 2, "--output"),
    Case("export-unknown-option", lambda c: _export(c, c.ckpt(), "--turbo"), 2, "--turbo"),
    Case(
        "export-output-under-a-file",
        _out_under_file(lambda c: _export(c, c.ckpt())),
        8,
        "is a file",
    ),
    Case(
        "export-output-is-a-file",
        lambda c: (c.out.write_text("x"), _export(c, c.ckpt()))[1],
        5,
        "is a file",
    ),
    Case(
        "export-output-foreign-dir",
        lambda c: (
            c.out.mkdir(),
            (c.out / "precious.txt").write_text("keep"),
            _export(c, c.ckpt()),
        )[2],
        5,
        "not a dsc artifact",
    ),
    Case(
        "export-disk-full",
        lambda c: (enospc(c), _export(c, c.ckpt()))[1],
        8,
        "No space left on device",
        late=True,
    ),
    Case(
        "export-disk-full-in-a-library",
        lambda c: (library_full(c), _export(c, c.ckpt()))[1],
        8,
        "No space left on device",
        late=True,
    ),
    Case(
        "export-disk-full-short-write",
        lambda c: (numpy_short_write(c), _export(c, c.ckpt()))[1],
        8,
        "a write stopped short, 0 of 65536 bytes written",
        late=True,
    ),
    Case(
        "export-disk-full-fallocate",
        lambda c: (numpy_fallocate_full(c), _export(c, c.ckpt()))[1],
        8,
        "no room for 369,098,752 bytes at offset 20,090,955,776",
        late=True,
    ),
    Case(
        "export-read-only-target",
        lambda c: (refused_by_os(errno.EROFS)(c), _export(c, c.ckpt()))[1],
        8,
        "Read-only file system",
        late=True,
    ),
    Case(
        "export-permission-denied",
        lambda c: (refused_by_os(errno.EACCES)(c), _export(c, c.ckpt()))[1],
        8,
        "Permission denied",
        late=True,
    ),
    # build
    Case(
        "build-int8-and-fp8", lambda c: _build(c, c.ckpt(), "--int8", "--fp8"), 2, "choose one of"
    ),
    Case("build-opset-5", lambda c: _build(c, c.ckpt(), "--opset", "5"), 2, "opset 5"),
    Case(
        "build-weight-only-fp8",
        lambda c: _build(c, c.ckpt(), "--fp8", "--weight-only"),
        2,
        "--weight-only",
    ),
    Case(
        "build-gate-without-quantization",
        lambda c: _build(c, c.ckpt(), "--validate", "gate"),
        2,
        "--validate gate",
    ),
    Case("build-max-batch-0", lambda c: _build(c, c.ckpt(), "--max-batch", "0"), 2, "--max-batch"),
    Case("build-calib-dev-zero", _calib(lambda c: Path("/dev/zero")), 3, "not a regular file"),
    Case(
        "build-calib-fifo",
        _calib(lambda c: c.fifo(c.root / "in" / "calib.txt")),
        3,
        "not a regular file",
    ),
    Case(
        "build-config-dev-zero",
        lambda c: _build(c, c.ckpt(), "--config", "/dev/zero"),
        3,
        "not a regular file",
    ),
    Case("build-config-unknown-key", _yaml("turbo: true\n"), 3, "unknown key 'turbo'"),
    Case("build-config-opset-5", _yaml("opset: 5\n"), 2, "opset 5"),
    Case(
        "build-unknown-profile",
        lambda c: ["build", str(c.ckpt()), "-o", str(c.out), "--profile", "rtx-9999"],
        3,
        "unknown profile",
    ),
    Case(
        "build-profile-name-escapes",
        lambda c: [
            "build",
            str(c.ckpt()),
            "-o",
            str(c.out),
            "--profile",
            str(profile_named(c, "../../outside/x")),
        ],
        3,
        "engines/<name>/",
    ),
    Case(
        "build-layers-absurd",
        _ck(lambda c, ck: edit_json(ck / "config.json", config(num_hidden_layers=10**9)), _build),
        3,
        "'num_hidden_layers'",
    ),
    Case(
        "build-tokenizer-garbage",
        _ck(lambda c, ck: (ck / "tokenizer.json").write_text("garbage"), _build),
        3,
        "tokenizer.json",
    ),
    Case(
        "build-merges-links-to-passwd",
        _ck(lambda c, ck: c.link(ck / "merges.txt", c.victim("passwd")), _build),
        3,
        "symbolic link",
        contained=True,
    ),
    Case(
        "build-output-under-a-file", _out_under_file(lambda c: _build(c, c.ckpt())), 8, "is a file"
    ),
    Case(
        "build-reuse-of-a-stage-claiming-an-outside-file",
        _tampered_out,
        3,
        "../outside/passwd",
        contained=True,
    ),
    Case("build-no-checkpoint", lambda c: ["build", "-o", str(c.out)], 2, "CHECKPOINT"),
    # optimize
    Case("optimize-onnx-dotdot", _art_then(_opt, _dotdot), 3, "leads outside", contained=True),
    Case("optimize-onnx-absolute", _art_then(_opt, _absolute), 3, "absolute path", contained=True),
    Case(
        "optimize-onnx-not-a-string",
        _art_then(_opt, lambda c, a: io_onnx(a, 123)),
        3,
        "not a file name",
    ),
    Case("optimize-onnx-link", _art_then(_opt, _graph_link), 3, "symbolic link", contained=True),
    Case(
        "optimize-side-file-link", _art_then(_opt, _side_link), 3, "symbolic link", contained=True
    ),
    Case(
        "optimize-external-data-dotdot",
        _art_then(_opt, _ext_dotdot),
        3,
        "external data",
        contained=True,
    ),
    Case(
        "optimize-external-data-link",
        _art_then(_opt, _ext_link),
        3,
        "symbolic link",
        contained=True,
    ),
    Case(
        "optimize-io-spec-garbage",
        _art_then(_opt, lambda c, a: (a / "model_io.json").write_text("{{")),
        3,
        "model_io.json",
    ),
    Case(
        "optimize-manifest-garbage",
        _art_then(_opt, lambda c, a: (a / "manifest.json").write_text("[]")),
        3,
        "not a dsc artifact",
    ),
    Case("optimize-fifo-in-artifact", _fifo_in_art(_opt), 3, "not a regular file"),
    Case(
        "optimize-unknown-pass",
        lambda c: [*_opt(c, c.art()), "--passes", "nope"],
        3,
        "unknown pass",
    ),
    Case(
        "optimize-output-under-a-file", _out_under_file(lambda c: _opt(c, c.art())), 8, "is a file"
    ),
    # quantize
    Case("quantize-onnx-dotdot", _art_then(_quant, _dotdot), 3, "leads outside", contained=True),
    Case("quantize-int8-and-fp8", lambda c: [*_quant(c, c.art()), "--fp8"], 2, "choose one of"),
    Case(
        "quantize-no-precision",
        lambda c: ["quantize", str(c.art()), "-o", str(c.out)],
        2,
        "choose a precision",
    ),
    Case(
        "quantize-weight-only-fp8",
        lambda c: ["quantize", str(c.art()), "-o", str(c.out), "--fp8", "--weight-only"],
        2,
        "--weight-only",
    ),
    Case("quantize-alpha-2", lambda c: [*_quant(c, c.art()), "--alpha", "2"], 2, "[0, 1]"),
    Case(
        "quantize-calib-dev-zero",
        _calib(lambda c: Path("/dev/zero"), "quantize"),
        3,
        "not a regular file",
    ),
    Case(
        "quantize-side-file-link", _art_then(_quant, _side_link), 3, "symbolic link", contained=True
    ),
    Case(
        "quantize-external-data-dotdot",
        _art_then(_quant, _ext_dotdot),
        3,
        "external data",
        contained=True,
    ),
    # run
    Case(
        "run-temperature-nan",
        lambda c: [*_run(c, c.art()), "--sample", "--temperature", "nan"],
        2,
        "temperature",
    ),
    Case(
        "run-temperature-negative",
        lambda c: [*_run(c, c.art()), "--temperature", "-1"],
        2,
        "temperature",
    ),
    Case("run-seed-negative", lambda c: [*_run(c, c.art()), "--seed", "-1"], 2, "seed"),
    Case(
        "run-max-new-tokens-0",
        lambda c: [*_run(c, c.art()), "--max-new-tokens", "0"],
        2,
        "--max-new-tokens",
    ),
    Case("run-onnx-dotdot", _art_then(_run, _dotdot), 3, "leads outside", contained=True),
    Case(
        "run-external-data-dotdot", _art_then(_run, _ext_dotdot), 3, "external data", contained=True
    ),
    Case(
        "run-tokenizer-garbage",
        _art_then(_run, lambda c, a: (a / "tokenizer.json").write_text('{"model": 42}')),
        3,
        "cannot load the tokenizer",
    ),
    # validate, bench, report, inspect
    Case(
        "validate-data-dev-zero",
        lambda c: [*_validate(c, c.art()), "--data", "/dev/zero"],
        3,
        "not a regular file",
    ),
    Case(
        "validate-data-fifo",
        lambda c: [*_validate(c, c.art()), "--data", str(c.fifo(c.root / "in" / "heldout.txt"))],
        3,
        "not a regular file",
    ),
    Case("validate-onnx-dotdot", _art_then(_validate, _dotdot), 3, "leads outside", contained=True),
    Case(
        "validate-reference-onnx-dotdot",
        lambda c: [
            *_validate(c, c.art()),
            "--reference",
            str(
                (
                    ref := c.root / "ref",
                    shutil.copytree(c._exported["llama"], ref),
                    victim_graph(c, ref),
                    io_onnx(ref, "../outside/victim/model.onnx"),
                )[0]
            ),
        ],
        3,
        "leads outside",
        contained=True,
    ),
    Case(
        "validate-windows-0", lambda c: [*_validate(c, c.art()), "--windows", "0"], 2, "--windows"
    ),
    Case("bench-batch-0", lambda c: [*_bench(c, c.art()), "--batch", "0"], 2, "--batch"),
    Case("bench-onnx-dotdot", _art_then(_bench, _dotdot), 3, "leads outside", contained=True),
    Case(
        "report-side-file-link",
        _art_then(lambda c, a: ["report", str(a)], _side_link),
        3,
        "symbolic link",
        contained=True,
    ),
    Case(
        "inspect-outputs-dotdot",
        _art_then(
            lambda c, a: ["inspect", str(a)], _manifest_outputs(lambda c: "../../outside/passwd")
        ),
        3,
        "leads outside",
        contained=True,
    ),
    Case(
        "inspect-manifest-fifo",
        _art_then(lambda c, a: ["inspect", str(a)], lambda c, a: c.fifo(a / "manifest.json")),
        3,
        "not a dsc artifact",
    ),
    # compile: only a verified artifact, only contained files
    Case(
        "compile-changed-graph",
        _art_then(_compile, lambda c, a: (a / "model.onnx").open("ab").write(b"\0")),
        1,
        "does not match manifest.json",
    ),
    Case(
        "compile-outputs-dotdot",
        _art_then(_compile, _manifest_outputs(lambda c: "../../outside/passwd")),
        3,
        "leads outside",
        contained=True,
    ),
    Case(
        "compile-stage-output-dotdot",
        _art_then(_compile, _stage_output_outside),
        3,
        "leads outside",
        contained=True,
    ),
    Case(
        "compile-side-file-link",
        _art_then(_compile, _side_link),
        3,
        "symbolic link",
        contained=True,
    ),
    Case(
        "compile-onnx-dotdot-rehashed",
        _art_then(_compile, lambda c, a: (_dotdot(c, a), rehash(a))),
        3,
        "leads outside",
        contained=True,
    ),
    Case(
        "compile-external-data-dotdot-rehashed",
        _art_then(_compile, _ext_dotdot_rehashed),
        3,
        "external data",
        contained=True,
    ),
    Case(
        "compile-unknown-profile",
        lambda c: ["compile", str(c.art()), "--profile", "nope"],
        3,
        "unknown profile",
    ),
    Case("compile-max-kv-0", lambda c: [*_compile(c, c.art()), "--max-kv", "0"], 2, "--max-kv"),
    # verify: everything the manifest claims, nothing outside opened
    Case(
        "verify-outputs-dotdot",
        _art_then(_verify, _manifest_outputs(lambda c: "../../outside/passwd")),
        1,
        "outside the artifact",
        contained=True,
    ),
    Case(
        "verify-outputs-absolute",
        _art_then(_verify, _manifest_outputs(lambda c: str(c.outside / "passwd"))),
        1,
        "outside the artifact",
        contained=True,
    ),
    Case(
        "verify-listed-link", _art_then(_verify, _listed_link), 1, "symbolic link", contained=True
    ),
    Case(
        "verify-unlisted-file",
        _art_then(_verify, lambda c, a: (a / "extra.txt").write_text("x")),
        1,
        "not listed",
    ),
    Case(
        "verify-unlisted-directory",
        _art_then(_verify, lambda c, a: (a / "engines").mkdir()),
        1,
        "directory holds no file",
    ),
    Case("verify-fifo", _fifo_in_art(_verify), 1, "not a regular file"),
    Case(
        "verify-graph-files-disagree",
        _art_then(
            _verify,
            lambda c, a: edit_json(
                a / "manifest.json", lambda m: m["graph"]["files"].update({"model.onnx": "0" * 64})
            ),
        ),
        1,
        "graph.files disagrees",
    ),
    Case(
        "verify-stage-disagrees",
        _art_then(
            _verify,
            lambda c, a: edit_json(
                a / "manifest.json",
                lambda m: m["stages"]["export"]["outputs"].update({"model.onnx": "0" * 64}),
            ),
        ),
        1,
        "disagrees with outputs",
    ),
    Case(
        "verify-manifest-garbage",
        _art_then(_verify, lambda c, a: (a / "manifest.json").write_text("{")),
        3,
        "not a dsc artifact",
    ),
    Case("verify-inputs-outside-checkpoint", _inputs_outside, 1, "not opened", contained=True),
    # plan, profiles, the command line itself
    Case("plan-vocab-size-zero", _plan_cfg(vocab_size=0), 3, "'vocab_size'"),
    Case("plan-hidden-size-string", _plan_cfg(hidden_size="abc"), 3, "'hidden_size'"),
    Case("plan-layers-absurd", _plan_cfg(num_hidden_layers=10**9), 3, "'num_hidden_layers'"),
    Case("plan-heads-zero", _plan_cfg(num_attention_heads=0), 3, "'num_attention_heads'"),
    Case(
        "plan-unsupported-architecture",
        _plan_cfg(architectures=["GPT2LMHeadModel"]),
        4,
        "GPT2LMHeadModel",
    ),
    Case(
        "plan-config-fifo",
        lambda c: ["plan", str(c.fifo(c.root / "in" / "config.json")), "--profile", "rtx-4090"],
        3,
        "not a regular file",
    ),
    Case(
        "plan-input-len-beyond-context",
        lambda c: [
            "plan",
            str(c.ckpt()),
            "--profile",
            "rtx-4090",
            "--context",
            "16",
            "--input-len",
            "64",
        ],
        2,
        "--input-len 64 exceeds the context of 16",
    ),
    Case(
        "plan-batch-0",
        lambda c: ["plan", str(c.ckpt()), "--profile", "rtx-4090", "--batch", "0"],
        2,
        "--batch",
    ),
    Case("profiles-show-unknown", lambda c: ["profiles", "show", "rtx-9999"], 3, "unknown profile"),
    Case(
        "profiles-show-fifo",
        lambda c: ["profiles", "show", str(c.fifo(c.root / "in" / "p.yaml"))],
        3,
        "not a regular file",
    ),
    Case("unknown-command", lambda c: ["frobnicate"], 2, "frobnicate"),
    Case("unknown-global-option", lambda c: ["--turbo", "plan"], 2, "--turbo"),
]

# How a refusal may end its line: the exit code the table promises, never 70.
_PROGRESS = ("[dsc] ", "dsc build ", "dsc compile ")


@pytest.fixture(scope="module")
def atime_works(tmp_path_factory) -> bool:
    return _atime_detects_reads(tmp_path_factory.mktemp("atime"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case: Case, tmp_path, checkpoints, exported, monkeypatch, capsys, atime_works):
    c = Ctx(tmp_path, checkpoints, exported, monkeypatch)
    argv = case.setup(c)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # whatever dsc might write to the current directory
    assert not case.contained or c.victims, "a containment case needs a victim"
    # Arm the detectors: victims' atime older than their mtime (a read moves it), watch opens.
    victims = {}
    for v in c.victims:
        st = v.stat()
        os.utime(v, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
        victims[v] = (v.read_bytes(), v.stat().st_mtime_ns, v.stat().st_atime_ns)
    before = _snapshot(tmp_path)
    _WATCHED.clear()
    _WATCHED.update(os.path.realpath(v) for v in c.victims)
    _OPENED.clear()
    # Log records and Python warnings reach stderr in a real run: route both to capsys.
    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = [logging.StreamHandler(sys.stderr)]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = run_cli(argv, capsys)
    finally:
        root.handlers = handlers
        _WATCHED.clear()
    opened = list(_OPENED)

    shown = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    lines = [ln for ln in err.splitlines() if ln.strip()] + [f"warning: {w}" for w in shown]
    assert code != 70, f"exit 70 (a bug in dsc): {err!r}"
    assert code == case.code, f"exit {code}, expected {case.code}: {err!r}"
    if case.late:
        assert all(ln.startswith(_PROGRESS) or ln.startswith(" " * 8) for ln in lines[:-1]), (
            f"unexpected output before the error: {lines!r}"
        )
        lines = lines[-1:]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("dsc: error: "), lines
    assert case.needle in lines[0], f"{case.needle!r} not in {lines[0]!r}"
    assert "Traceback" not in err and "above" not in err
    after = _snapshot(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files changed, appeared or disappeared: {changed}"
    for v, (data, mtime, atime) in victims.items():
        assert v.read_bytes() == data and v.stat().st_mtime_ns == mtime, f"{v} was changed"
        assert os.path.realpath(v) not in opened, f"{v} was opened"
        if atime_works:
            assert v.stat().st_atime_ns == atime, f"{v} was read (its atime moved)"


def test_the_detectors_see_a_read(tmp_path, atime_works):
    """The audit hook sees Python's opens; atime sees any reader, here one in another process."""
    v = tmp_path / "victim"
    v.write_bytes(b"secret")
    _WATCHED.add(os.path.realpath(v))
    _OPENED.clear()
    try:
        v.read_bytes()
    finally:
        _WATCHED.clear()
    assert [os.path.realpath(v)] == _OPENED
    if atime_works:
        st = v.stat()
        os.utime(v, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
        subprocess.run(["cat", str(v)], check=True, capture_output=True)
        assert v.stat().st_atime_ns != st.st_mtime_ns - 10**12


def test_enough_cases_across_every_command():
    commands = {next(a for a in c.id.split("-")) for c in CASES}
    assert len(CASES) >= 60
    assert {
        "export",
        "build",
        "optimize",
        "quantize",
        "run",
        "validate",
        "bench",
        "report",
        "inspect",
        "compile",
        "verify",
        "plan",
        "profiles",
    } <= commands
    assert sum(c.contained for c in CASES) >= 25


# --- signals ------------------------------------------------------------------------------------

_WAITING_EXPORT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import dsc.export.onnx_export as ex

    def waiting(info, out_dir, **kw):
        (out_dir / "model.onnx").write_bytes(b"partial")
        Path(sys.argv[1]).write_text("ready")
        time.sleep(120)
        raise AssertionError("not interrupted")

    ex.export_graph = waiting
    from dsc.cli import main
    main(sys.argv[2:])
""")


def _default_signals() -> None:
    """In the child: SIGINT/SIGTERM as a terminal gives them. A suite started in the background
    by a shell without job control (`cmd &`, nohup) inherits SIGINT ignored, and Python then
    leaves it ignored (as a background job should), so the test would see no Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _signal_midway(
    tmp_path: Path, script: str, argv: list[str], signum: int, timeout: float = 90
) -> tuple[int, str]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(ready), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        preexec_fn=_default_signals,
    )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the stage never started: {err[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("dsc did not stop on the signal") from None
    return proc.returncode, err


def _no_temp(parent: Path, out: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_during_export(tmp_path, checkpoints, signum, code):
    out = tmp_path / "out"
    rc, err = _signal_midway(
        tmp_path, _WAITING_EXPORT, ["export", str(checkpoints["llama"]), "-o", str(out)], signum
    )
    assert rc == code, err
    assert err.strip().splitlines()[-1] in ("dsc: interrupted", "dsc: terminated")
    assert "Traceback" not in err
    assert not out.exists() and not _no_temp(tmp_path, out)


def test_sigterm_during_build_leaves_the_old_artifact(tmp_path, checkpoints, exported):
    out = tmp_path / "out"
    from dsc import api

    api.export(checkpoints["llama"], out, dtype="fp16", progress=lambda m: None)
    before = _snapshot(out)
    rc, err = _signal_midway(
        tmp_path,
        _WAITING_EXPORT,
        ["build", str(checkpoints["llama"]), "-o", str(out), "--profile", "rtx-4090", "--rebuild"],
        signal.SIGTERM,
    )
    assert rc == 143, err
    assert _snapshot(out) == before and not _no_temp(tmp_path, out)


_TRT_SIGINT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from dsc.backends.tensorrt import builder

    make = builder._make_logger

    def interrupting_logger(trt, verbose):
        # Ctrl-C while TensorRT is inside build_serialized_network: the signal arrives while
        # TensorRT calls this logger from C++, which is where it used to be swallowed.
        log = make(trt, verbose)
        cls, plain = type(log), type(log).log

        def log_and_interrupt(self, severity, msg):
            if "build" in str(msg).lower() and not Path(sys.argv[1]).exists():
                Path(sys.argv[1]).write_text("ready")
                os.kill(os.getpid(), signal.SIGINT)
            return plain(self, severity, msg)

        cls.log = log_and_interrupt
        return log

    builder._make_logger = interrupting_logger
    from dsc.cli import main
    main(sys.argv[2:])
""")


@pytest.mark.rtx
def test_ctrl_c_during_tensorrt_compile(tmp_path, exported):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    before = _snapshot(art)
    ready = tmp_path / "ready"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _TRT_SIGINT,
            str(ready),
            "compile",
            str(art),
            "--profile",
            "rtx-4090",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        preexec_fn=_default_signals,
    )
    assert ready.exists(), proc.stderr[-2000:]
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "dsc: interrupted"
    assert "Traceback" not in proc.stderr
    assert _snapshot(art) == before and not _no_temp(tmp_path, art)


def test_stale_temp_dirs_of_dead_runs_are_removed(tmp_path, checkpoints, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd1234"
    (stale / "engines").mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getppid()}-efgh5678"  # a running process's build
    live.mkdir()
    code, _, err = run_cli(
        ["export", str(checkpoints["llama"]), "-o", str(out), "--dtype", "fp32"], capsys
    )
    assert code == 0, err
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
