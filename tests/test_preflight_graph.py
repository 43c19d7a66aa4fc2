"""The graph a preflight compiles (dsc.pipeline.preflight_graph): the first layers, the last
layer and the head of a deep graph compute what the checkpoint holding only those layers does."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dsc.pipeline.preflight_graph import (
    NotCuttable,
    cut_to_layers,
    preflight_graph,
    representative_layers,
    slice_vocab,
    vocab_size,
)

from .conftest import run_cli


def _quiet(*_a, **_k):
    return None


def _truncated(src, dst, keep: list[int]):
    """The checkpoint `src` with only decoder layers `keep`, renumbered 0..len(keep)-1."""
    from dsc.fixtures import _copy_side_files, read_tensors, write_shards

    layer = re.compile(r"^model\.layers\.(\d+)\.")
    new = {k: i for i, k in enumerate(keep)}
    tensors = {}
    for name, t in read_tensors(src).items():
        m = layer.match(name)
        if m is None:
            tensors[name] = t
        elif int(m.group(1)) in new:
            tensors[layer.sub(f"model.layers.{new[int(m.group(1))]}.", name)] = t
    _copy_side_files(src, dst)
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    for key, value in config.items():  # per-layer lists (layer_types, ...)
        if isinstance(value, list) and len(value) == n:
            config[key] = [value[k] for k in keep]
    config["num_hidden_layers"] = len(keep)
    (dst / "config.json").write_text(json.dumps(config))
    write_shards(tensors, dst, shards=1)
    return dst


def _prefill(path, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and KV outputs of one prefill with an empty cache, by KV output position."""
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t = tokens.shape[1]
    feeds = {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = tokens
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(tokens)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(t, dtype=np.int64)[None]
        else:  # past KV: batch 1, nothing cached
            dims = [d if isinstance(d, int) else None for d in i.shape]
            first = dims.index(None)
            shape = [1 if j == first else (0 if d is None else d) for j, d in enumerate(dims)]
            feeds[i.name] = np.zeros(shape, np.float32)
    names = [o.name for o in s.get_outputs()]
    out = dict(zip(names, s.run(None, feeds), strict=True))
    return out.pop("logits"), out


@pytest.mark.parametrize(
    ("family", "layers", "keep"), [("qwen2", 5, [0, 1, 4]), ("deepseek_v3", 6, [0, 1, 2, 5])]
)
def test_cut_graph_equals_checkpoint_with_those_layers(
    family, layers, keep, tmp_path, fixture_with_layers
):
    from dsc import api

    ckpt = fixture_with_layers(family, layers)
    full = tmp_path / "full"
    api.export(ckpt, full, dtype="fp32", progress=_quiet, external_data=True)
    proto = onnx.load(str(full / "model.onnx"), load_external_data=False)
    assert representative_layers(proto) == keep
    with preflight_graph(full / "model.onnx", "layers") as (path, record):
        assert record["graph"] == "layers" and record["layers"] == keep
        assert record["of_layers"] == layers
        assert 0 < record["compiled_weights_bytes"] < record["weights_bytes"]
        # beside the graph, reading its data file: no weight is copied
        assert path.parent == full
        assert path.stat().st_size <= (full / "model.onnx").stat().st_size
        tokens = np.random.default_rng(0).integers(3, 64, (1, 12)).astype(np.int64)
        got, got_kv = _prefill(path, tokens)
        # the vocabulary cut to 64 entries: the same first 64 logits, bit for bit
        cut = onnx.load(str(path), load_external_data=False)
        assert slice_vocab(cut, full, rows=64) == vocab_size(proto) > 64
        onnx.save(cut, str(full / "sliced.onnx"))
        sliced, sliced_kv = _prefill(full / "sliced.onnx", tokens)
        assert sliced.shape[-1] == 64
        np.testing.assert_array_equal(sliced, got[..., :64])
        for name, value in sliced_kv.items():
            np.testing.assert_array_equal(value, got_kv[name])
    assert not path.exists()  # removed on exit
    small = tmp_path / "small"
    api.export(
        _truncated(ckpt, tmp_path / "ckpt-small", keep),
        small,
        dtype="fp32",
        progress=_quiet,
    )
    want, want_kv = _prefill(small / "model.onnx", tokens)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{family}: layers {keep} of {layers}, logits max rel err {err:.2e}")
    assert err <= 1e-5
    # the KV outputs of the kept layers, renumbered
    assert len(got_kv) == len(want_kv) == len(keep) * len(got_kv) // len(keep)
    for name, value in got_kv.items():
        i = int(name.split(".")[1])
        twin = name.replace(f"present.{i}.", f"present.{keep.index(i)}.")
        np.testing.assert_allclose(value, want_kv[twin], rtol=1e-5, atol=1e-6)


def test_shallow_or_small_graphs_stay_whole(exported):
    path = exported["deepseek_v3"] / "model.onnx"  # 4 layers: first dense, first MoE differ
    proto = onnx.load(str(path), load_external_data=False)
    with pytest.raises(NotCuttable):
        cut_to_layers(proto)
    with preflight_graph(path, "layers") as (got, record):
        assert got == path and record["graph"] == "whole" and "not_cut" in record
    with preflight_graph(exported["qwen2"] / "model.onnx", "auto") as (got, record):
        assert got == exported["qwen2"] / "model.onnx" and record["graph"] == "whole"
    with pytest.raises(ValueError, match="preflight graph mode"), preflight_graph(path, "half"):
        pass


def test_compile_preflight_of_the_cut_graph(tmp_path, fixture_with_layers, capsys):
    """`builder.preflight_graph=layers` makes a tiny graph take the path a >1 GiB one takes by
    default: the preflight compiles layers 0, 1 and 4 of 5 and records it; nothing is left."""
    import shutil

    from dsc import api

    ckpt = fixture_with_layers("qwen2", 5)
    api.export(ckpt, tmp_path / "exported", dtype="fp16", progress=_quiet)
    runs = {}
    for mode in ("layers", "full"):
        art = tmp_path / mode
        shutil.copytree(tmp_path / "exported", art)
        argv = ["compile", str(art), "--profile", "jetson-orin", "--max-kv", "64"]
        code, _, err = run_cli([*argv, "--set", f"builder.preflight_graph={mode}"], capsys)
        assert code == 0, err
        pre = json.loads((art / "engines/jetson-agx-orin-64gb/preflight.json").read_text())
        manifest = json.loads((art / "manifest.json").read_text())
        entry = manifest["profiles"]["jetson-agx-orin-64gb"]["preflight"]
        assert entry["graph"] == pre["graph"]
        assert not list(art.glob("*.preflight.onnx"))
        runs[mode] = pre
    cut, whole = runs["layers"], runs["full"]
    assert cut["graph"]["graph"] == "layers", cut["graph"]
    assert cut["graph"]["layers"] == [0, 1, 4]
    assert "layers 0, 1, 4 of 5" in cut["meaning"]
    assert whole["graph"]["graph"] == "whole" and whole["graph"]["mode"] == "full"
    assert cut["num_layers"] < whole["num_layers"]
    assert cut["size_bytes"] < whole["size_bytes"]
