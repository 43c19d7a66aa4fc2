"""dsc.manifest: the schema, stage input hashes, verify (every hash) and inspect."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from dsc.manifest import (
    canonical_hash,
    check_schema,
    export_inputs,
    format_inspect,
    hash_tree,
    inspect_artifact,
    load_schema,
    schema_errors,
    sha256_file,
    verify_artifact,
)
from dsc.models.checkpoint import inspect_checkpoint

from .conftest import run_cli


@pytest.fixture
def art(exported, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(exported["llama"], dst)
    return dst


def _m(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_schema_is_valid_json_schema():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_export_manifest_validates_and_hashes_its_stage(exported, checkpoints):
    m = _m(exported["llama"])
    assert schema_errors(m) == []
    st = m["stages"]["export"]
    assert st["status"] == "ran"
    assert st["input_hash"] == canonical_hash(st["inputs"])
    info = inspect_checkpoint(checkpoints["llama"])
    expect = export_inputs(info, dtype="fp32", opset=None, tools=m["tools"], stream=True)
    assert st["inputs"] == json.loads(json.dumps(expect))
    assert st["outputs"] == m["outputs"]
    assert m["graph"]["files"]["model.onnx"] == m["outputs"]["model.onnx"]
    assert m["graph"]["hash"] == canonical_hash(m["graph"]["files"])
    assert m["precision"] == "fp32" and m["command"] == "export"


def test_canonical_hash_ignores_key_order_not_values():
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    b = {"y": {"a": "s", "b": [1, 2]}, "x": 1}
    assert canonical_hash(a) == canonical_hash(b)
    assert canonical_hash(a) != canonical_hash({**a, "x": 2})
    assert canonical_hash({"y": [1, 2]}) != canonical_hash({"y": [2, 1]})
    assert len(canonical_hash(a)) == 64


@pytest.mark.parametrize(
    "break_it, where",
    [
        (lambda m: m.pop("outputs"), "top level"),
        (lambda m: m["outputs"].update({"model.onnx": "abc"}), "outputs.model.onnx"),
        (lambda m: m["outputs"].update({"../escape": "0" * 64}), "outputs"),
        (lambda m: m.update(schema_version=2), "schema_version"),
        (lambda m: m["stages"]["export"].update(status="done"), "stages.export.status"),
        (lambda m: m["stages"]["export"].pop("input_hash"), "stages.export"),
        (lambda m: m["stages"].update(optimize={"status": "not_run"}), "stages.optimize"),
        (lambda m: m["source"].update(inputs={}), "source.inputs"),
        (lambda m: m.update(profiles={"a100": {"status": "built"}}), "profiles.a100"),
    ],
)
def test_schema_rejects_broken_manifests(exported, break_it, where):
    m = copy.deepcopy(_m(exported["llama"]))
    break_it(m)
    errors = schema_errors(m)
    assert errors and any(e.startswith(f"at {where}") for e in errors), errors
    with pytest.raises(Exception, match="does not match the manifest schema"):
        check_schema(m)


def test_schema_rejects_a_built_profile_without_engine(exported):
    m = copy.deepcopy(_m(exported["llama"]))
    m["profiles"] = {
        "a100-80gb": {
            "status": "built",
            "sm": 80,
            "engine": None,
            "preflight": None,
            "device_command": None,
            "profile": {
                "name": "a100-80gb",
                "compute_capability": "8.0",
                "precisions": ["fp16"],
                "builder": {},
                "envelope": {},
            },
            "envelope": {"max_batch": 1, "max_input_len": 8, "max_kv": 16},
            "options": {},
            "plan": {"fits": True, "precision": "fp16", "total_bytes": 1, "capacity_bytes": 2},
        }
    }
    assert any("profiles.a100-80gb" in e for e in schema_errors(m))
    m["profiles"]["a100-80gb"]["status"] = "awaiting_device_build"
    assert any("profiles.a100-80gb" in e for e in schema_errors(m))  # needs a preflight


def test_verify_clean_artifact(art, capsys):
    r = verify_artifact(art)
    assert r.ok and r.checked == len(_m(art)["outputs"]) and r.problems == []
    code, out, err = run_cli(["verify", str(art)], capsys)
    assert code == 0 and out.startswith(f"OK: {r.checked} files"), err


@pytest.mark.parametrize("name", ["model.onnx", "model_io.json", "tokenizer.json"])
def test_one_flipped_byte_fails_verify_naming_the_file(art, name, capsys):
    path = art / name
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x20
    path.write_bytes(bytes(data))
    r = verify_artifact(art)
    assert [f for f, _ in r.problems] == [name]
    code, out, err = run_cli(["verify", str(art)], capsys)
    assert code == 1
    assert f"MISMATCH {name}: sha256" in out
    assert err.startswith("dsc: error:") and name in err


def test_verify_reports_a_manifest_that_breaks_the_schema(art, capsys):
    m = _m(art)
    m["stages"]["export"]["status"] = "finished"
    (art / "manifest.json").write_text(json.dumps(m))
    code, out, _ = run_cli(["verify", str(art), "--json"], capsys)
    assert code == 1
    (p,) = json.loads(out)["problems"]
    assert p["file"] == "manifest.json" and "stages.export.status" in p["problem"]


def test_verify_inputs_rehashes_the_checkpoint(art, checkpoints, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["llama"], ck)
    r = verify_artifact(art, checkpoint=ck)
    assert r.ok and r.inputs_checked == len(_m(art)["source"]["inputs"])
    with (ck / "config.json").open("a") as f:
        f.write(" ")
    code, out, err = run_cli(["verify", str(art), "--checkpoint", str(ck)], capsys)
    assert code == 1 and "config.json" in err and "input sha256 differs" in out


def test_verify_of_a_non_artifact_is_bad_input(tmp_path, capsys):
    code, _, err = run_cli(["verify", str(tmp_path)], capsys)
    assert code == 3 and "not a dsc artifact" in err


def test_hash_tree_walks_subdirectories(tmp_path):
    (tmp_path / "engines" / "a").mkdir(parents=True)
    (tmp_path / "engines" / "a" / "model.engine").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("y")
    (tmp_path / "manifest.json").write_text("{}")
    h = hash_tree(tmp_path)
    assert list(h) == ["b.txt", "engines/a/model.engine"]
    assert h["engines/a/model.engine"] == sha256_file(tmp_path / "engines/a/model.engine")


def test_inspect_an_exported_artifact(art, capsys):
    s = inspect_artifact(art)
    assert s["stages"]["export"]["status"] == "ran"
    assert s["stages"]["compile"] == {"status": "absent"}
    assert s["profiles"] == {} and s["files"] == len(_m(art)["outputs"])
    assert s["bytes"] == sum((art / r).stat().st_size for r in _m(art)["outputs"])
    text = format_inspect(s)
    assert "engines: none" in text and "llama (LlamaForCausalLM)" in text
    code, out, _ = run_cli(["inspect", str(art), "--json"], capsys)
    assert code == 0 and json.loads(out)["graph"]["dtype"] == "fp32"


def test_each_file_is_hashed_once_per_stage(checkpoints, tmp_path, monkeypatch):
    """export, optimize and quantize read each file they write once to hash it: the graph
    record takes the digests the manifest's outputs already hold (the data file was hashed
    twice, 2 × 31 GB read at DeepSeek-V2-Lite), and they are the same digests."""
    from collections import Counter

    import dsc.manifest as manifest
    from dsc import api
    from dsc.models import checkpoint

    calls: Counter = Counter()
    real = manifest.sha256_file

    def counting(path, *a, **kw):
        calls[str(path)] += 1
        return real(path, *a, **kw)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    import dsc.export.onnx_export as ex

    start = ex._FollowingHash.start

    def following(self):  # export's data file, hashed behind its writer
        calls[str(self._path)] += 1
        start(self)

    monkeypatch.setattr(ex._FollowingHash, "start", following)
    from dsc.export.prewrite import PreWrite

    begin = PreWrite.begin

    def prewritten(self, *args, hash_data, **kwargs):  # hashed by the process writing it
        if hash_data:
            calls[str(self.data_path)] += 1
        begin(self, *args, hash_data=hash_data, **kwargs)

    monkeypatch.setattr(PreWrite, "begin", prewritten)
    e, o, q = tmp_path / "e", tmp_path / "o", tmp_path / "q"
    api.export(checkpoints["deepseek_v3"], e, dtype="fp16", external_data=True)
    api.optimize(e, o, profile="rtx-4090")
    api.quantize(o, q, "int8", samples=4, seq_len=32)
    # The files each stage wrote, hashed in its temporary directory: each once.
    tmp_hashes = {k: n for k, n in calls.items() if ".tmp-" in k}
    # export's, optimize's, quantize's and its reference/'s
    assert sum(k.endswith("/model.onnx.data") for k in tmp_hashes) == 4
    assert max(tmp_hashes.values()) == 1, tmp_hashes
    for art in (e, o, q):
        m = json.loads((art / "manifest.json").read_text())
        for name, digest in m["graph"]["files"].items():
            assert m["outputs"][name] == digest == real(art / name), name
        assert verify_artifact(art).ok


def test_the_checkpoint_is_hashed_beside_the_export(checkpoints, tmp_path, monkeypatch):
    """`dsc export` hashes the checkpoint on its own thread while the graph is exported, and
    records the same digests; an export that fails stops that hash instead of waiting for it."""
    import threading

    import dsc.export.onnx_export as ex
    import dsc.manifest as manifest
    from dsc import api
    from dsc.errors import BadInput
    from dsc.models import checkpoint

    ckpt = checkpoints["qwen2"]
    threads = []
    real = manifest.sha256_file
    monkeypatch.setenv("DSC_HASH_CACHE", "0")  # every file hashed, not taken from the cache

    def recording(path, *a, **kw):
        threads.append(threading.current_thread().name)
        return real(path, *a, **kw)

    monkeypatch.setattr(checkpoint, "sha256_file", recording)
    api.export(ckpt, tmp_path / "e", dtype="fp16", progress=lambda m: None)
    info = inspect_checkpoint(ckpt)
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    recorded = m["stages"]["export"]["inputs"]["checkpoint"]
    assert recorded == {p.relative_to(ckpt).as_posix(): real(p) for p in info.input_files()}
    assert recorded and threads[: len(recorded)] == ["dsc-hash-checkpoint_0"] * len(recorded)
    assert verify_artifact(tmp_path / "e").ok

    # The export fails at once while the hash is held: the hash sees the stop and ends.
    stopped = []

    def slow(path, *a, stop=None, **kw):
        assert stop is not None and stop.wait(30)
        stopped.append(path)
        return real(path, *a, stop=stop, **kw)

    def failing(*a, **kw):
        raise BadInput("injected")

    monkeypatch.setattr(checkpoint, "sha256_file", slow)
    monkeypatch.setattr(ex, "export_graph", failing)
    with pytest.raises(BadInput, match="injected"):
        api.export(ckpt, tmp_path / "f", dtype="fp16", progress=lambda m: None)
    assert len(stopped) == 1 and not (tmp_path / "f").exists()
    # A stopped hash raises; it never returns the digest of part of a file.
    from dsc.models.checkpoint import HashCancelled

    done = threading.Event()
    done.set()
    with pytest.raises(HashCancelled):
        real(stopped[0], stop=done)


def test_a_checkpoint_hash_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """`sha256_file_cached`: a second hash of an unchanged file reads nothing and gives the
    same digest; a file rewritten with its size and modification time put back is hashed
    again (its inode change time moved); a malformed entry is ignored and replaced; a file
    that changes while it is hashed, or changed in the last `HASH_CACHE_MIN_AGE_S`, is not
    remembered; `DSC_HASH_CACHE=0` hashes every time."""
    import hashlib
    import os
    import time

    from dsc.models import checkpoint

    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DSC_HASH_CACHE", raising=False)
    real = checkpoint.sha256_file
    reads: list[str] = []

    def counting(path, *a, **kw):
        reads.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 10_000)
    want = hashlib.sha256(b"a" * 10_000).hexdigest()
    # Just written: not remembered (a second write in the same clock tick could go unseen).
    assert checkpoint.sha256_file_cached(f) == want and len(reads) == 1
    assert checkpoint.sha256_file_cached(f) == want and len(reads) == 2
    assert not list(checkpoint.hash_cache_dir().glob("*.sha256"))
    monkeypatch.setattr(checkpoint, "HASH_CACHE_MIN_AGE_S", 0.0)  # the tests' files are new
    reads.clear()
    assert checkpoint.sha256_file_cached(f) == want and len(reads) == 1
    assert checkpoint.sha256_file_cached(f) == want and len(reads) == 1  # from the cache
    (entry,) = checkpoint.hash_cache_dir().glob("*.sha256")
    assert not list(checkpoint.hash_cache_dir().glob(".*"))  # no temporary file left

    st = f.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick
    f.write_bytes(b"b" * 10_000)  # same size; the modification time put back below
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert checkpoint.sha256_file_cached(f) == hashlib.sha256(b"b" * 10_000).hexdigest()
    assert len(reads) == 2

    for entry in checkpoint.hash_cache_dir().glob("*.sha256"):
        entry.write_text("not a digest")
    assert checkpoint.sha256_file_cached(f) == hashlib.sha256(b"b" * 10_000).hexdigest()
    assert len(reads) == 3
    assert checkpoint.sha256_file_cached(f) == hashlib.sha256(b"b" * 10_000).hexdigest()
    assert len(reads) == 3  # the malformed entry was replaced

    g = tmp_path / "growing.safetensors"
    g.write_bytes(b"c" * 100)

    def appending(path, *a, **kw):
        digest = counting(path, *a, **kw)
        with open(path, "ab") as fh:
            fh.write(b"d")
        return digest

    monkeypatch.setattr(checkpoint, "sha256_file", appending)
    checkpoint.sha256_file_cached(g)
    monkeypatch.setattr(checkpoint, "sha256_file", counting)
    before = len(reads)
    assert checkpoint.sha256_file_cached(g) == hashlib.sha256(b"c" * 100 + b"d").hexdigest()
    assert len(reads) == before + 1  # the digest of the changing file was not kept

    monkeypatch.setenv("DSC_HASH_CACHE", "0")
    before = len(reads)
    checkpoint.sha256_file_cached(f)
    checkpoint.sha256_file_cached(f)
    assert len(reads) == before + 2


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path, size):
    """The chunked hash (one buffer reused across chunks) equals hashlib's over the whole file,
    for sizes below, at and across a chunk boundary (4,096-byte chunks here)."""
    import hashlib

    from dsc.models.checkpoint import sha256_file

    data = bytes(range(256)) * (size // 256 + 1)
    path = tmp_path / "f.bin"
    path.write_bytes(data[:size])
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data[:size]).hexdigest()


def test_export_hashes_its_data_file_beside_the_range_check(checkpoints, tmp_path, monkeypatch):
    """`dsc export` hashes model.onnx.data on its own thread, behind the writer and on while
    the fp16 range check runs (`_FollowingHash`), once, and the manifest holds that digest:
    the file's sha256. An export that fails after the write (an fp16 overflow) stops that hash
    and leaves no output. This is the path of onnx_ir's writer (`DSC_PREWRITE=0`); the file
    written by a second process is hashed there (tests/test_prewrite.py)."""
    import threading
    import time
    from pathlib import Path

    import dsc.export.onnx_export as ex
    import dsc.manifest as manifest
    from dsc import api
    from dsc.errors import BadInput
    from dsc.models import checkpoint as ck

    real = ck.sha256_file
    data_hashes: list[str] = []

    def spy(path, *args, **kwargs):
        if Path(path).name == "model.onnx.data":
            data_hashes.append(threading.current_thread().name)
        return real(path, *args, **kwargs)

    run = ex._FollowingHash._run

    def following(self):
        data_hashes.append(threading.current_thread().name)
        return run(self)

    monkeypatch.setattr(ck, "sha256_file", spy)
    monkeypatch.setattr(manifest, "sha256_file", spy)
    monkeypatch.setattr(ex._FollowingHash, "_run", following)
    monkeypatch.setenv("DSC_PREWRITE", "0")
    art = tmp_path / "art"
    api.export(checkpoints["qwen2"], art, dtype="fp16", external_data=True, progress=lambda m: 0)
    assert len(data_hashes) == 1 and data_hashes[0].startswith("dsc-hash-data"), data_hashes
    m = json.loads((art / "manifest.json").read_text())
    assert m["outputs"]["model.onnx.data"] == real(art / "model.onnx.data")
    assert m["graph"]["files"]["model.onnx.data"] == m["outputs"]["model.onnx.data"]

    src = tmp_path / "hot"
    shutil.copytree(checkpoints["deepseek_v2"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, routed_scaling_factor=1e6)))
    with pytest.raises(BadInput, match="overflows"):
        api.export(src, tmp_path / "f", dtype="fp16", external_data=True, progress=lambda m: 0)
    assert not (tmp_path / "f").exists()
    deadline = time.monotonic() + 10
    while any(t.name.startswith("dsc-hash-data") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the data file's hash outlived the failed export"
        time.sleep(0.05)
