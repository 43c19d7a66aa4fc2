"""Tracing one decoder layer per kind and copying it (`--trace-layers kinds`, the default) against
tracing every layer (`--trace-layers all`).

On every tiny family made 4 layers deep (so that layers 2 and 3 are copies: V2/V3 have a dense
layer 0 and MoE layers after it), both exports must be the same graph node for node (operator,
attributes, where each input comes from, module scope), with the same weights byte for byte and
the same outputs bit for bit in ONNX Runtime; and the kinds export must trace 2 layers, not 4.
"""

from __future__ import annotations

import ast
import hashlib

import numpy as np
import onnx
import pytest

from dsc import api
from dsc.export import by_kind, onnx_export
from dsc.node_meta import SCOPE_KEY

from .conftest import FAMILIES

LAYERS = 4


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tokenizer_dir):
    from dsc.fixtures import make_fixture

    root = tmp_path_factory.mktemp("deep")

    class _Lazy(dict):
        def __missing__(self, family):
            self[family] = make_fixture(
                family,
                root / family,
                tokenizer_dir=tokenizer_dir,
                overrides={"num_hidden_layers": LAYERS},
            )
            return self[family]

    return _Lazy()


def _traced_layers(monkeypatch) -> list[int]:
    """Records the depth of every model `torch.onnx.export` traces (with the trace cache off, so
    that every export traces)."""
    monkeypatch.setenv("DSC_TRACE_CACHE", "0")
    return record_traces(monkeypatch)


def record_traces(monkeypatch) -> list[int]:
    """The depth of every model `torch.onnx.export` traces from now on, appended as it goes."""
    seen: list[int] = []
    trace = onnx_export._trace

    def spy(wrapper, args, family, num_layers, *rest, **kw):
        seen.append(num_layers)
        return trace(wrapper, args, family, num_layers, *rest, **kw)

    monkeypatch.setattr(onnx_export, "_trace", spy)
    return seen


def _canonical(model: onnx.ModelProto):
    """The graph with values named by where they come from: (graph input name), (initializer
    dtype, dims, sha256 of bytes) or (node index, output index); nodes as (op, domain,
    attributes, inputs, module scope without the node's own name)."""
    g = model.graph
    ids: dict[str, tuple] = {i.name: ("input", i.name) for i in g.input}
    for t in g.initializer:
        data = onnx.numpy_helper.to_array(t).tobytes()
        ids[t.name] = ("init", t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())
    for k, n in enumerate(g.node):
        for j, o in enumerate(n.output):
            ids[o] = ("node", k, j)
    nodes = []
    for n in g.node:
        attrs = [
            (a.name, len(a.g.node))
            if a.type == onnx.AttributeProto.GRAPH
            else (a.name, str(onnx.helper.get_attribute_value(a)))
            for a in n.attribute
        ]
        scope = next((p.value for p in n.metadata_props if p.key == SCOPE_KEY), None)
        scope = ast.literal_eval(scope)[:-1] if scope else None
        inputs = [ids.get(i, ("outer", i)) for i in n.input]
        nodes.append((n.op_type, n.domain, attrs, inputs, scope))
    io = [(v.name, v.type.SerializeToString()) for v in [*g.input, *g.output]]
    return nodes, [ids[o.name] for o in g.output], io


def _run(path, io_spec: dict):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {}
    for spec in io_spec["inputs"]:
        name = spec["name"]
        if name == "input_ids":
            feed[name] = rng.integers(0, io_spec["vocab_size"], (2, 3), dtype=np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((2, 8), np.int64)
        elif name == "position_ids":
            feed[name] = np.tile(np.arange(5, 8, dtype=np.int64), (2, 1))
        else:
            _, heads, _, dim = spec["shape"]
            feed[name] = (rng.standard_normal((2, heads, 5, dim)) * 0.5).astype(spec["dtype"])
    return sess.run(None, feed)


@pytest.mark.parametrize("family", FAMILIES)
def test_copied_layers_are_the_traced_graph(tmp_path, deep, family, monkeypatch):
    import json

    dtype = "bf16" if family == "llama" else "fp16"  # one family through bf16 storage
    traced = _traced_layers(monkeypatch)
    lines: list[str] = []
    api.export(deep[family], tmp_path / "kinds", dtype=dtype, progress=lines.append)
    assert traced == [2], traced
    assert any(f"layers 2..{LAYERS - 1} copied" in line for line in lines), lines
    api.export(deep[family], tmp_path / "all", dtype=dtype, trace_layers="all", progress=_quiet)
    assert traced == [2, LAYERS]

    kinds = onnx.load(str(tmp_path / "kinds" / "model.onnx"))
    whole = onnx.load(str(tmp_path / "all" / "model.onnx"))
    nodes_k, outs_k, io_k = _canonical(kinds)
    nodes_w, outs_w, io_w = _canonical(whole)
    assert io_k == io_w
    assert len(nodes_k) == len(nodes_w)
    assert [k for k, (a, b) in enumerate(zip(nodes_k, nodes_w, strict=True)) if a != b] == []
    assert outs_k == outs_w
    # every copied layer's nodes carry its own scope, as the traced layers' do
    scopes = {s[3] for *_, s in nodes_k if s and len(s) > 3 and ".layers." in s[3]}
    assert scopes == {f"model.model.layers.{i}" for i in range(LAYERS)}

    if dtype == "bf16":
        return  # ONNX Runtime's CPU provider has no bf16 MatMul; the graphs are equal above
    io_spec = json.loads((tmp_path / "kinds" / "model_io.json").read_text())
    got = _run(tmp_path / "kinds" / "model.onnx", io_spec)
    want = _run(tmp_path / "all" / "model.onnx", io_spec)
    assert len(got) == 1 + 2 * LAYERS
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
    assert np.isfinite(got[0]).all() and float(np.abs(got[0]).max()) > 0


def test_a_graph_that_does_not_split_is_traced_whole(tmp_path, deep, monkeypatch):
    """When the cut graph breaks an assumption, the export says so and traces every layer."""

    def refuse(model, **kw):
        raise by_kind.NotInstantiable("a test refuses")

    monkeypatch.setattr(by_kind, "instantiate", refuse)
    traced = _traced_layers(monkeypatch)
    lines: list[str] = []
    api.export(deep["qwen2"], tmp_path / "out", dtype="fp16", progress=lines.append)
    assert traced == [2, LAYERS]
    assert any("a test refuses" in line and "tracing every layer" in line for line in lines)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert sum(o.name.startswith("present.") for o in model.graph.output) == 2 * LAYERS


@pytest.mark.parametrize(
    "kinds, depth",
    [
        ("aaaa", 2),  # R1-Distill: one kind
        ("dmmm", 2),  # V2-Lite: a dense layer 0, then MoE
        ("dddmm", 4),  # V3: three dense layers (first_k_dense_replace = 3)
        ("ababab", 3),  # alternating kinds (sliding / full attention)
        ("aa", None),  # nothing left to copy
        ("dm", None),
    ],
)
def test_cut_depth(kinds, depth):
    assert by_kind.cut_depth(list(kinds)) == depth


def test_cut_config_trims_per_layer_fields():
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=6, layer_types=["full_attention"] * 6)
    cut = by_kind.cut_config(config, 2)
    assert (cut.num_hidden_layers, cut.layer_types) == (2, ["full_attention"] * 2)
    assert config.num_hidden_layers == 6  # the original is untouched


def test_the_export_is_the_same_bytes_every_time(tmp_path, deep):
    """Two exports of one checkpoint write the same files: the copies' initializers are
    registered in the order their nodes read them, not in a set's (object-address) order,
    which changed the data file's layout from run to run."""
    for name in ("a", "b"):
        api.export(
            deep["deepseek_v2"], tmp_path / name, dtype="fp16", external_data=True, progress=_quiet
        )
    for file in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
