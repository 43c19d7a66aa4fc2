"""The trace cache (`dsc.export.trace_cache`): an export whose cut graph comes from the cache
writes the same files, byte for byte, as one that traces, and traces nothing; an entry that is
corrupt or does not fit the checkpoint is dropped and the model traced again."""

from __future__ import annotations

import json

import pytest

from dsc import api
from dsc.export import trace_cache

from .conftest import FAMILIES
from .test_export_by_kind import CUT, LAYERS, deep, record_traces  # noqa: F401  (4-layer fixtures)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of this test's own, and a record of the depths traced."""
    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DSC_TRACE_CACHE", raising=False)
    return record_traces(monkeypatch)


def _files(directory):
    return {f: (directory / f).read_bytes() for f in ("model.onnx", "model.onnx.data")}


def _entries():
    return sorted(trace_cache.cache_dir().glob("*.onnx"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cached_trace_writes_the_traced_files(tmp_path, deep, family, cache):  # noqa: F811
    dtype = "bf16" if family == "llama" else "fp16"
    first: list[str] = []
    api.export(deep[family], tmp_path / "a", dtype=dtype, external_data=True, progress=first.append)
    assert cache == [CUT[family]]
    assert len(_entries()) == 1
    second: list[str] = []
    api.export(
        deep[family], tmp_path / "b", dtype=dtype, external_data=True, progress=second.append
    )
    assert cache == [CUT[family]], "the second export traced"
    assert any("in the trace cache" in line for line in second), second
    assert not any("in the trace cache" in line for line in first), first
    assert any(f"layers {CUT[family]}..{LAYERS - 1} copied" in line for line in second), second
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    for name in a:
        assert a[name] == b[name], name
    for name in ("model_io.json",):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_an_entry_is_per_config_dtype_and_tools(tmp_path, deep, cache, monkeypatch):  # noqa: F811
    api.export(deep["qwen2"], tmp_path / "fp16", dtype="fp16", progress=lambda m: None)
    api.export(deep["qwen2"], tmp_path / "fp32", dtype="fp32", progress=lambda m: None)
    assert cache == [CUT["qwen2"]] * 2 and len(_entries()) == 2
    base = dict(architecture="Qwen2ForCausalLM", dtype="torch.float16", opset=None)
    key = trace_cache.trace_key({"rope_theta": 1e4}, **base)
    assert key == trace_cache.trace_key({"rope_theta": 1e4}, **base)
    assert key != trace_cache.trace_key({"rope_theta": 1e6}, **base)
    assert key != trace_cache.trace_key({"rope_theta": 1e4}, **dict(base, opset=20))
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "0.0-test" if d == "onnxscript" else real(d))
    assert key != trace_cache.trace_key({"rope_theta": 1e4}, **base)


def test_copies_of_a_checkpoint_share_an_entry(tmp_path, deep, cache, monkeypatch):  # noqa: F811
    """A copy of a checkpoint in another directory, its config.json written by another
    transformers, hits the original's entry (the key leaves out `trace_cache.PROVENANCE`), and
    writes the files a fresh trace of the copy writes, byte for byte: the directory and the
    writer's version are not in the graph."""
    import shutil

    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(deep["qwen2"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "4.0.0"
    (copy / "config.json").write_text(json.dumps(config))
    api.export(deep["qwen2"], tmp_path / "original", dtype="fp16", progress=lambda m: None)
    assert cache == [CUT["qwen2"]] and len(_entries()) == 1
    lines: list[str] = []
    api.export(copy, tmp_path / "hit", dtype="fp16", external_data=True, progress=lines.append)
    assert cache == [CUT["qwen2"]], "the copy traced"
    assert any("in the trace cache" in line for line in lines), lines
    monkeypatch.setenv("DSC_TRACE_CACHE", "0")
    api.export(copy, tmp_path / "traced", dtype="fp16", external_data=True, progress=lambda m: None)
    assert cache == [CUT["qwen2"]] * 2
    hit, traced = _files(tmp_path / "hit"), _files(tmp_path / "traced")
    for name in hit:
        assert hit[name] == traced[name], name
    base = dict(architecture="Qwen2ForCausalLM", dtype="torch.float16", opset=None)
    here = {"rope_theta": 1e4, "_name_or_path": "/a", "transformers_version": "5.0.0"}
    there = dict(here, _name_or_path="/b", transformers_version="4.0.0")
    assert trace_cache.trace_key(here, **base) == trace_cache.trace_key(there, **base)


def test_the_cache_can_be_turned_off(tmp_path, deep, cache, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DSC_TRACE_CACHE", "0")
    for name in ("a", "b"):
        api.export(deep["qwen2"], tmp_path / name, dtype="fp16", progress=lambda m: None)
    assert cache == [CUT["qwen2"]] * 2
    assert _entries() == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "shape", "unmapped"])
def test_a_bad_entry_is_dropped_and_traced_again(tmp_path, deep, cache, damage):  # noqa: F811
    import onnx

    api.export(deep["qwen2"], tmp_path / "a", dtype="fp16", external_data=True, progress=print)
    (entry,) = _entries()
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"not an onnx model" * 10)
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 3])
    else:
        proto = onnx.ModelProto()
        proto.ParseFromString(data)
        meta = next(p for p in proto.metadata_props if p.key == trace_cache.METADATA_KEY)
        mapping = json.loads(meta.value)
        name = sorted(mapping)[0]
        if damage == "shape":  # the weight is said to be a tensor of another shape
            dims = {t.name: tuple(t.dims) for t in proto.graph.initializer}
            other = next(n for n in sorted(mapping) if dims[n] != dims[name])
            mapping[name] = mapping[other]
        else:  # a placeholder that no mapping entry names
            del mapping[name]
        meta.value = json.dumps(mapping)
        entry.write_bytes(proto.SerializeToString())
    lines: list[str] = []
    api.export(
        deep["qwen2"], tmp_path / "b", dtype="fp16", external_data=True, progress=lines.append
    )
    assert cache == [CUT["qwen2"]] * 2, "the bad entry was used"
    assert any("is unusable" in line and "tracing" in line for line in lines), lines
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    (again,) = _entries()
    assert again.read_bytes() == data  # replaced by the fresh trace's entry


def test_the_cache_keeps_the_most_recent_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(trace_cache, "MAX_ENTRIES", 2)
    import os

    for i, key in enumerate(["a" * 64, "b" * 64, "c" * 64]):
        path = trace_cache.store(key, b"entry %d" % i)
        os.utime(path, (1000 + i, 1000 + i))
    assert [p.name[:1] for p in _entries()] == ["b", "c"]
    assert trace_cache.store("d" * 64, b"x") is not None
    assert [p.name[:1] for p in _entries()] == ["c", "d"]


def test_an_unwritable_cache_does_not_stop_the_export(tmp_path, deep, monkeypatch):  # noqa: F811
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory would be")
    monkeypatch.setenv("DSC_CACHE_DIR", str(blocker))
    monkeypatch.delenv("DSC_TRACE_CACHE", raising=False)
    api.export(deep["qwen2"], tmp_path / "out", dtype="fp16", progress=lambda m: None)
    assert (tmp_path / "out" / "model.onnx").is_file()
