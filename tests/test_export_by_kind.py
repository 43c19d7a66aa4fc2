"""Tracing one decoder layer per kind and copying it (`--trace-layers kinds`, the default) against
tracing every layer (`--trace-layers all`).

On every tiny family made 4 layers deep (Llama and Qwen2: layer 0 traced, layers 1..3 copies
of it; V2/V3 have a dense layer 0 and MoE layers after it: layers 0 and 1 traced, 2 and 3
copied), both exports must be the same graph node for node (operator, attributes, where each
input comes from, module scope), with the same weights byte for byte and the same outputs bit
for bit in ONNX Runtime; and the kinds export must trace 1 or 2 layers, not 4.
"""

from __future__ import annotations

import ast
import hashlib
import re

import numpy as np
import onnx
import pytest

from dsc import api
from dsc.export import by_kind, onnx_export
from dsc.node_meta import SCOPE_KEY

from .conftest import FAMILIES

LAYERS = 4
# The layers the kinds export traces (`by_kind.cut_depth`): one of each kind.
CUT = {"llama": 1, "qwen2": 1, "deepseek_v2": 2, "deepseek_v3": 2}


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


_PAST = re.compile(r"^past_key_values\.\d+\.")


def _canonical(model: onnx.ModelProto):
    """The graph with every value named by how it is computed, so that two graphs are equal
    when they compute the same values the same way, in whatever order their nodes come: a
    graph input by its name, an initializer by (dtype, dims, sha256 of bytes), a node output
    by the digest of (op, domain, attributes, its inputs' names, module scope without the
    node's own name, output index). Returns (a Counter of node signatures, the outputs' names,
    the graph's inputs and outputs).

    One exception: a `Shape` of a graph input is named by the symbolic dimensions it reads
    (`batch`, `past`, ...), not by the input. Every cache input has the trace's one `batch`
    and one `past` dimension, as the attention mask has `batch`, so the sizes the layers
    share are the same whichever input the tracer read them from: the whole trace reads them
    from layer 1's cache, a trace cut to layer 0 from layer 0's and from the mask."""
    from collections import Counter

    g = model.graph
    ids: dict[str, object] = {i.name: ("input", i.name) for i in g.input}
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input
    }
    for t in g.initializer:
        data = onnx.numpy_helper.to_array(t).tobytes()
        ids[t.name] = ("init", t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())
    nodes = Counter()
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
        if n.op_type == "Shape" and n.input[0] in dims:
            a = {k: int(v) for k, v in attrs}
            inputs = [("dims", tuple(dims[n.input[0]][a.get("start", 0) : a.get("end")]))]
            attrs = []
        signature = (n.op_type, n.domain, attrs, inputs, scope)
        nodes[repr(signature)] += 1
        digest = hashlib.sha256(repr(signature).encode()).hexdigest()
        for j, o in enumerate(n.output):
            ids[o] = ("node", digest, j)
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
    assert traced == [CUT[family]], traced
    assert any(f"layers {CUT[family]}..{LAYERS - 1} copied" in line for line in lines), lines
    api.export(deep[family], tmp_path / "all", dtype=dtype, trace_layers="all", progress=_quiet)
    assert traced == [CUT[family], LAYERS]

    kinds = onnx.load(str(tmp_path / "kinds" / "model.onnx"))
    whole = onnx.load(str(tmp_path / "all" / "model.onnx"))
    nodes_k, outs_k, io_k = _canonical(kinds)
    nodes_w, outs_w, io_w = _canonical(whole)
    assert io_k == io_w
    assert nodes_k.total() == nodes_w.total() == len(kinds.graph.node)
    assert nodes_k - nodes_w == nodes_w - nodes_k == {}
    assert outs_k == outs_w
    # every copied layer's nodes carry its own scope, as the traced layers' do
    scopes = set()
    for n in kinds.graph.node:
        scope = next((p.value for p in n.metadata_props if p.key == SCOPE_KEY), None)
        scope = ast.literal_eval(scope)[:-1] if scope else None
        if scope and len(scope) > 3 and ".layers." in scope[3]:
            scopes.add(scope[3])
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
    assert traced == [CUT["qwen2"], LAYERS]
    assert any("a test refuses" in line and "tracing every layer" in line for line in lines)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert sum(o.name.startswith("present.") for o in model.graph.output) == 2 * LAYERS


@pytest.mark.parametrize(
    "kinds, depth",
    [
        ("aaaa", 1),  # R1-Distill: one kind
        ("aa", 1),
        ("dmmm", 2),  # V2-Lite: a dense layer 0, then MoE
        ("dddmm", 4),  # V3: three dense layers (first_k_dense_replace = 3)
        ("ababab", 2),  # alternating kinds (sliding / full attention)
        ("a", None),  # nothing left to copy
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
