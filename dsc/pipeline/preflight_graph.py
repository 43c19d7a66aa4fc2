"""The graph a preflight compiles: the whole graph, or its first layers and the head.

A preflight (a target whose engine is built on the device: Jetson, H100) compiles the graph with
TensorRT-RTX for the nearest SM it targets, to show that the graph parses and every layer
compiles at its precision; the engine is discarded. TensorRT-RTX's builder holds about 3.3x the
graph's weight bytes of host memory (R1-Distill-Qwen-1.5B INT8, 2.12 GiB engine: 7.06 GiB peak
RSS, 4.86 GiB of it anonymous; `benchmarks/compile_rss.py`, docs/BENCHMARKS.md), so a 7B graph
(about 8 GiB of weights at INT8 with an fp16 vocabulary) would need about 27 GiB.
The builder's own ways to need less do not work without a GPU: a refittable or weight-stripped
build (`REFIT`, `STRIP_PLAN`, which TensorRT-RTX 1.7's weight placeholders belong to) fails with
a Myelin CUDA error on a CPU-only host, and handing the parser memory-mapped initializers
(`load_initializer`) changes nothing, since `parse_from_file` already maps the data file.

Every decoder layer of one kind is the same subgraph with other weights, so compiling one of
each kind shows what compiling all of them does. `cut_to_layers` keeps the nodes before the
first layer (embedding, rotary tables, masks), layers 0..m-1, and layer N-1 with the head (final
norm, lm_head); layer N-1 reads from layer m-1 what it read from layer N-2. m is the least that
covers every kind of layer the graph has and ends on a layer shaped like layer N-2 (2 for the
dense families: layer 0 differs, it reads the embedding; for DeepSeek-V2/V3 the dense first
layers and one MoE layer). The KV inputs and outputs of the dropped layers go. Its logits are
those of the checkpoint with only those layers (tests/test_preflight_graph.py). The vocabulary
is then cut to its first 4,096 entries (`slice_vocab`; same ops, fewer rows). At 1.5B INT8 the
preflight so needs 0.80 GiB and 3 s instead of 7.12 GiB and 44 s. The preflight's `graph`
record says which graph was compiled.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from dsc.passes.quant.layerwise import SegmentPlan, layer_of, reads

# Weights above which the preflight compiles the cut graph (builder.preflight_graph: auto).
CUT_MIN_WEIGHT_BYTES = 1 << 30
MODES = ("auto", "layers", "full")
_KV = re.compile(r"^(?:past_key_values|present)\.(\d+)\.")


class NotCuttable(ValueError):
    """The graph has no cut that compiles every kind of layer (then the whole graph is used)."""


def _signature(nodes) -> tuple:
    return tuple((n.domain, n.op_type, len(n.input), len(n.output)) for n in nodes)


def layer_nodes(proto: onnx.ModelProto) -> dict[int, list[int]]:
    """{decoder layer: indices of the graph's nodes scoped to it, in graph order}."""
    out: dict[int, list[int]] = {}
    for i, n in enumerate(proto.graph.node):
        layer = layer_of(n)
        if layer is not None:
            out.setdefault(layer, []).append(i)
    return out


def representative_layers(proto: onnx.ModelProto, plan: SegmentPlan | None = None) -> list[int]:
    """The layers the cut graph keeps: 0..m-1 and N-1, m the least such that they hold every
    kind of layer (by their nodes' operators) and layer m-1's segment is shaped like layer N-2's
    (layer N-1 then reads from layer m-1 what it read from layer N-2). Raises NotCuttable when
    that keeps every layer or the layers are not numbered 0..N-1."""
    plan = plan or SegmentPlan(proto)
    layers = layer_nodes(proto)
    n = len(layers)
    if sorted(layers) != list(range(n)) or len(plan) != n + 1:
        raise NotCuttable(f"decoder layers are not numbered 0..{n - 1}")
    g = proto.graph
    kind = [_signature(g.node[i] for i in layers[k]) for k in range(n)]
    seg = [_signature(g.node[i] for i in plan.segments[k + 1]) for k in range(n)]
    for m in range(1, n - 1):
        if seg[m - 1] == seg[n - 2] and set(kind) <= set(kind[:m]) | {kind[n - 1]}:
            return [*range(m), n - 1]
    raise NotCuttable(f"every one of the {n} layers is needed to cover each kind")


def cut_to_layers(proto: onnx.ModelProto, keep: list[int] | None = None) -> onnx.ModelProto:
    """The graph with the nodes before the first layer, layers `keep` = [0..m-1, N-1] (default
    `representative_layers`) and the head, layer N-1 reading from layer m-1 what it read from
    layer N-2 (see the module docstring). Initializers keep their external-data references.
    Raises NotCuttable when layer N-1 reads something it cannot take from layer m-1."""
    g = proto.graph
    plan = SegmentPlan(proto)
    keep = keep or representative_layers(proto, plan)
    n = len(plan) - 1
    m = len(keep) - 1
    if keep != [*range(m), n - 1] or not 1 <= m < n - 1:
        raise NotCuttable(f"cannot keep layers {keep} of {n}")
    src, twin = plan.segments[n - 1], plan.segments[m]  # layer N-2's segment, layer m-1's
    if _signature(g.node[i] for i in src) != _signature(g.node[i] for i in twin):
        raise NotCuttable(f"layer {m - 1} is not shaped like layer {n - 2}")
    remap = {}
    for a, b in zip(src, twin, strict=True):
        for out_a, out_b in zip(g.node[a].output, g.node[b].output, strict=True):
            if out_a:
                remap[out_a] = out_b
    dropped = {o for s in plan.segments[m + 1 : n] for i in s for o in g.node[i].output}
    nodes = [g.node[i] for s in plan.segments[: m + 1] for i in s]
    for i in plan.segments[n]:
        node = onnx.NodeProto()
        node.CopyFrom(g.node[i])
        for j, name in enumerate(node.input):
            node.input[j] = remap.get(name, name)
        if any(r in dropped for r in reads(node)):
            raise NotCuttable(f"layer {n - 1} reads from a dropped layer other than {n - 2}")
        nodes.append(node)

    def kv_layer(name: str) -> int | None:
        match = _KV.match(name)
        return int(match.group(1)) if match else None

    outputs = [o for o in g.output if kv_layer(o.name) in (None, *keep)]
    need = {o.name for o in outputs}
    live = []  # only the nodes the remaining outputs need
    for node in reversed(nodes):
        if any(o in need for o in node.output):
            live.append(node)
            need.update(reads(node))
    live.reverse()
    produced = {o for node in live for o in node.output}
    missing = [o.name for o in outputs if o.name not in produced]
    if missing:
        raise NotCuttable(f"outputs {missing[:3]} lost their producers")
    graph = onnx.helper.make_graph(
        live,
        g.name,
        [i for i in g.input if i.name in need],
        outputs,
        [t for t in g.initializer if t.name in need],
        value_info=[v for v in g.value_info if v.name in produced],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version
    )
    model.functions.extend(proto.functions)
    for p in proto.metadata_props:
        model.metadata_props.add().CopyFrom(p)
    return model


PREFLIGHT_VOCAB = 4096  # vocabulary rows a cut graph keeps (slice_vocab)
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _elem_size(data_type: int) -> int | None:
    """Bytes per element of a TensorProto type; None for sub-byte types (INT4, FP4) and
    non-numeric ones."""
    try:
        np_type = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    except (KeyError, ValueError, TypeError):
        return None
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or np_type.kind in "OSU":
        return None
    size = np_type.itemsize
    return size if size in _RAW else None


def vocab_size(proto: onnx.ModelProto) -> int | None:
    """The static last dim of the `logits` output, or None."""
    for o in proto.graph.output:
        if o.name == "logits":
            dims = o.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    return None


def slice_vocab(proto: onnx.ModelProto, base_dir: Path, rows: int = PREFLIGHT_VOCAB) -> int:
    """Keep the first `rows` entries of the vocabulary in place: every initializer with one dim
    equal to the vocabulary size (the embedding table [V, D], lm_head [D, V], their per-channel
    scales) is cut along it, read from its external data through a memory map (only the rows
    kept are touched) and stored inline; the `logits` output's last dim becomes `rows`. The ops
    are unchanged, so the compile proves the same; at 1.5B the vocabulary (151,936 x 1,536,
    twice) is 0.87 of a cut graph's weights. Returns the vocabulary size, or 0 when the graph
    was left as it was (no static vocabulary, already small, a sub-byte or ambiguous tensor)."""
    vocab = vocab_size(proto)
    if vocab is None or vocab <= rows:
        return 0
    hits = []
    for t in proto.graph.initializer:
        axes = [i for i, d in enumerate(t.dims) if d == vocab]
        if not axes:
            continue
        size = _elem_size(t.data_type)
        if len(axes) != 1 or size is None:
            return 0
        hits.append((t, axes[0], size))
    if not hits:
        return 0
    for t, axis, size in hits:
        shape = tuple(int(d) for d in t.dims)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            arr = np.memmap(
                base_dir / info["location"],
                dtype=_RAW[size],
                mode="r",
                offset=int(info.get("offset", 0)),
                shape=shape,
            )
        else:
            arr = np.frombuffer(t.raw_data, dtype=_RAW[size]).reshape(shape)
        index = [slice(None)] * len(shape)
        index[axis] = slice(0, rows)
        part = np.ascontiguousarray(arr[tuple(index)])
        del arr
        t.ClearField("external_data")
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = part.tobytes()
        t.dims[axis] = rows
    for o in proto.graph.output:
        if o.name == "logits":
            o.type.tensor_type.shape.dim[-1].dim_value = rows
    return vocab


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of model.onnx and its external data files beside it."""
    return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*") if p.is_file())


@contextlib.contextmanager
def preflight_graph(onnx_path: Path, mode: str) -> Iterator[tuple[Path, dict]]:
    """Context manager: (the ONNX file the preflight compiles, its `graph` record).

    mode "full": `onnx_path`; "layers": the cut graph, written beside `onnx_path` as
    `<name>.preflight.onnx` (it reads the same external data file; nothing is copied) and
    deleted on exit, or `onnx_path` when the graph has no useful cut; "auto": "layers" above
    CUT_MIN_WEIGHT_BYTES of weights, else "full". Raises ValueError for another mode.
    """
    if mode not in MODES:
        raise ValueError(f"preflight graph mode must be one of {', '.join(MODES)}, got {mode!r}")
    size = weight_bytes(onnx_path)
    record = {"mode": mode, "graph": "whole", "weights_bytes": size}
    if mode == "full" or (mode == "auto" and size <= CUT_MIN_WEIGHT_BYTES):
        yield onnx_path, record
        return
    proto = onnx.load(str(onnx_path), load_external_data=False)
    try:
        keep = representative_layers(proto)
        n = len(layer_nodes(proto))
        cut = cut_to_layers(proto, keep)
    except NotCuttable as e:
        yield onnx_path, record | {"not_cut": str(e)}
        return
    del proto
    vocab = slice_vocab(cut, onnx_path.parent)
    cut_bytes = sum(
        int({e.key: e.value for e in t.external_data}.get("length", 0))
        if t.data_location == onnx.TensorProto.EXTERNAL
        else len(t.raw_data)
        for t in cut.graph.initializer
    )
    out = onnx_path.with_name(onnx_path.stem + ".preflight.onnx")
    try:
        onnx.save(cut, str(out))
        del cut
        yield (
            out,
            record
            | {
                "graph": "layers",
                "layers": keep,
                "of_layers": n,
                "compiled_weights_bytes": cut_bytes,
                "vocab_rows": PREFLIGHT_VOCAB if vocab else None,
                "meaning": (
                    f"decoder layers {', '.join(map(str, keep))} of {n} (every kind of layer the "
                    f"graph has), with the embedding and the head"
                    + (f" cut to the first {PREFLIGHT_VOCAB} of {vocab} tokens" if vocab else "")
                    + "; the other layers are the same subgraphs with other weights"
                ),
            },
        )
    finally:
        out.unlink(missing_ok=True)
