"""Trace one decoder layer of each kind, then instantiate it for every layer of that kind.

`torch.export` and the exporter's optimizer spend time per node, so a whole-model trace grows
with depth: on DeepSeek-R1-Distill-Qwen-1.5B (28 layers) they were about 50 s of an 81 s
streaming export, and 66 → 256 s from 4 to 28 layers of the 7B config (docs/BENCHMARKS.md).
A decoder layer's graph depends on its kind, not on its index, so:

1. **Kinds** (`layer_kinds`). Layer i's kind is what decides its graph: the class of each of its
   modules, the names, shapes and dtypes of its parameters and buffers, and every plain
   attribute of its modules (attention type, sliding window, ...) other than `layer_idx`.
   R1-Distill-Qwen has one kind; V2-Lite two (the dense layer 0, then 26 MoE layers).
2. **Cut** (`cut_depth`, `cut_config`). The model is traced with its config cut to its first m
   layers, m the least such that every kind is found below m: each kind's template is its
   first layer. R1-Distill traces 1 layer, V2-Lite 2 (the dense layer 0, one MoE layer), V3 4
   (three dense layers, one MoE layer). `torch.export` and the exporter's decompositions cost
   about 3 s per traced layer of the 1.5B on a 2-core host (docs/BENCHMARKS.md), so the one
   layer of R1-Distill saves that over a cut of two.
3. **Instantiate** (`instantiate`), on the optimized cut graph (onnx_ir). A layer's nodes are
   those of its module scope (the exporter's `pkg.torch.onnx.name_scopes`), less those that
   depend on no layer's weights or cache (constants and shape arithmetic the optimizer shared
   between layers: they stay shared). A template's input hidden state is layer r-1's output,
   or for layer 0 the one value it reads that depends, through data and not only its shape,
   on a weight outside the layers (the embedding's output). Layer j >= m is a copy (onnx_ir's
   `Cloner`) of the template of its kind with the hidden state of layer j-1 as input,
   `past_key_values.j.*` as its cache inputs, layer j's weights (lazy: read from the
   checkpoint when written, transposed as the template's were), outputs `present.j.*`, and
   `layers.j` in its names and metadata.
   The final norm then reads layer N-1's hidden state.

Anything that breaks these assumptions (a layer that reads another layer's values besides its
input hidden state, a weight the optimizer folded from a layer's data, a cut whose kinds differ
from the full model's) raises `NotInstantiable`; the exporter then traces every layer. The
graph computes what the whole-model trace computes, node for node: tests compare the two
exports' logits and cache outputs in ONNX Runtime on every tiny family with more layers than
its cut (`tests/test_export_by_kind.py`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

from dsc.errors import unwrapped
from dsc.node_meta import SCOPE_KEY, module_path

__all__ = ["NotInstantiable", "cut_config", "cut_depth", "instantiate", "layer_kinds"]

_SCOPE_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_NAME_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PAST = re.compile(r"^past_key_values\.(\d+)\.")
_PRESENT = re.compile(r"^present\.(\d+)\.")
# Config fields that hold one entry per layer (transformers 5: Qwen2Config.layer_types).
PER_LAYER_FIELDS = ("layer_types",)


class NotInstantiable(Exception):
    """The cut graph does not split into layers as `instantiate` requires (message: why)."""


def layer_kinds(model) -> list[tuple]:
    """One hashable signature per decoder layer of a transformers causal LM (`model.model.layers`):
    equal signatures, equal graphs (up to the layer's weights and index)."""
    kinds = []
    for layer in model.model.layers:
        modules = []
        for name, m in layer.named_modules():
            attrs = tuple(
                sorted(
                    (k, v)
                    for k, v in vars(m).items()
                    if isinstance(v, (bool, int, float, str, type(None)))
                    and k not in ("layer_idx", "training")
                )
            )
            modules.append((name, type(m).__qualname__, attrs))
        tensors = tuple(
            (n, tuple(t.shape), str(t.dtype))
            for n, t in layer.state_dict(keep_vars=True).items()
            if t is not None
        )
        kinds.append((tuple(modules), tensors))
    return kinds


def cut_depth(kinds: list) -> int | None:
    """The number m of leading layers to trace (module docstring, 2), or None when that would
    be every layer (nothing to instantiate)."""
    first: dict = {}
    for i, k in enumerate(kinds):
        first.setdefault(k, i)
    m = max(first.values(), default=0) + 1
    return m if m < len(kinds) else None


def cut_config(config, num_layers: int):
    """A copy of the transformers `config` with its first `num_layers` layers only."""
    cut = copy.deepcopy(config)
    total = cut.num_hidden_layers
    cut.num_hidden_layers = num_layers
    for field in PER_LAYER_FIELDS:
        value = getattr(cut, field, None)
        if isinstance(value, list) and len(value) == total:
            setattr(cut, field, value[:num_layers])
    return cut


def instantiate(
    model,
    *,
    kinds: list,
    weights: dict,
    make_weight: Callable[[str, str, tuple[int, ...] | None, object], object],
    has_key: Callable[[str], bool],
) -> int:
    """Grow the optimized cut graph `model` (an `onnx_ir.Model` of the first m layers) to all
    `len(kinds)` layers, in place; return the number of nodes added.

    `kinds`: `layer_kinds` of the full model (its first m equal the cut's). `weights`:
    {initializer value: (state-dict key, permutation or None)} of those holding checkpoint
    data, as written (`dsc.export.onnx_export`; by value, since the optimizer renames values);
    the copies' weights are added to it. `make_weight(name, key, perm, like)`: a lazy `onnx_ir`
    tensor `name` of that key, permuted, with the dtype and shape of the tensor `like`.
    `has_key(key)`: whether the checkpoint holds the state-dict key.

    Raises `NotInstantiable` (module docstring); the model may then be half grown: discard it.
    Nothing here reads a weight but the deduplication of tensors of <= 1,024 elements."""
    import onnx_ir as ir
    from onnx_ir._cloner import Cloner
    from onnx_ir.passes.common import DeduplicateInitializersPass

    graph = model.graph
    n_total = len(kinds)
    nodes = list(graph)
    node_layer: dict = {}
    unscoped = []
    for node in nodes:
        match = _SCOPE_LAYER.search(module_path(node) or "")
        node_layer[node] = int(match.group(1)) if match else None
        if SCOPE_KEY not in node.metadata_props:
            unscoped.append(node)
    # Nodes a rewrite made carry no scope (the fusions' Split of a Slice pair): they take the
    # layer of the nodes they read from, or else of those that read them.
    for node in unscoped:
        near = {node_layer.get(v.producer()) for v in _reads(node) if v.producer() is not None}
        if len(near - {None}) != 1:
            near = {node_layer.get(c) for o in node.outputs for c in o.consumers()}
        if len(near - {None}) == 1:
            node_layer[node] = (near - {None}).pop()
    m = 1 + max((v for v in node_layer.values() if v is not None), default=-1)
    if m < 1 or m >= n_total:
        raise NotInstantiable(f"the cut graph has {m} layers of {n_total}")

    def init_layer(value) -> int | None:
        key = weights[value][0] if value in weights else value.name
        found = {int(x) for x in _NAME_LAYER.findall(key)}
        folded = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from", "")
        found |= {int(x) for x in _NAME_LAYER.findall(folded)}
        if len(found) > 1:
            raise NotInstantiable(f"initializer {value.name} is made from several layers")
        return found.pop() if found else None

    # Which layers' weights each value depends on (through Shape too). A cache input depends on
    # none: the tracer computes the sizes all layers share from one layer's cache (it reads
    # `Shape(past_key_values.0.key)` once, for every layer), and those stay shared. A checkpoint
    # weight of no layer (the embedding table) counts as `_EMBEDDED`, through data only: layer
    # 0's first nodes (its norm's upcast of the embedding) depend on nothing else, yet are its.
    none: frozenset = frozenset()
    wdeps: dict = {}
    for v in graph.initializers.values():
        layer = init_layer(v)
        if layer is not None:
            wdeps[v] = frozenset({layer})
        else:
            wdeps[v] = frozenset({_EMBEDDED}) if v in weights else none
    for node in nodes:
        w = none
        for v in _reads(node):
            w |= wdeps.get(v, none)
        if node.op_type in _SHAPE_OPS and node.domain in ("", "ai.onnx"):
            w -= {_EMBEDDED}
        for o in node.outputs:
            wdeps[o] = w

    # Layer i: the nodes of its scope that depend on some layer's weights. The epilogue: the
    # other nodes that do (the final norm, lm_head). The rest is shared: the prologue,
    # constants, and the shape arithmetic the optimizer merged between layers.
    groups: list[list] = [[] for _ in range(m)]
    epilogue = []
    for node in nodes:
        deps = wdeps[node.outputs[0]] if node.outputs else none
        if node_layer[node] is None:
            if deps - {_EMBEDDED}:
                epilogue.append(node)
        elif deps:
            groups[node_layer[node]].append(node)

    def produced_by(nodes_) -> set:
        return {o for n in nodes_ for o in n.outputs}

    outputs_of = [produced_by(g) for g in groups]
    layer_of_value = {v: i for i, vals in enumerate(outputs_of) for v in vals}

    def external(nodes_, own: set) -> list:
        # In the order the nodes read them, not a set's: the copies' initializers are
        # registered in this order, and with it the data file's layout (same bytes every run).
        return list(dict.fromkeys(v for n in nodes_ for v in _reads(n) if v not in own))

    embedded = [v for v in external(groups[0], outputs_of[0]) if _EMBEDDED in wdeps.get(v, none)]
    hidden_in: dict[int, object] = {0: embedded[0] if len(embedded) == 1 else None}
    for i in range(1, m):
        from_layers = [v for v in external(groups[i], outputs_of[i]) if v in layer_of_value]
        if len(from_layers) != 1 or layer_of_value[next(iter(from_layers))] != i - 1:
            raise NotInstantiable(
                f"layer {i} reads {len(from_layers)} values of other layers, not the hidden "
                f"state of layer {i - 1}"
            )
        hidden_in[i] = from_layers.pop()
    last_reads = [v for v in external(epilogue, produced_by(epilogue)) if v in layer_of_value]
    if len(last_reads) != 1 or layer_of_value[next(iter(last_reads))] != m - 1:
        raise NotInstantiable(f"the final norm reads {len(last_reads)} values of the layers")
    last_hidden = last_reads.pop()
    hidden_out = {i: hidden_in[i + 1] for i in range(1, m - 1)} | {m - 1: last_hidden}

    template: dict = {}
    for i in range(m):
        template.setdefault(kinds[i], i)
    names = {v.name for v in wdeps} | {v.name for v in graph.inputs} | {n.name for n in nodes}
    inputs = list(graph.inputs)
    outputs = list(graph.outputs)
    epilogue_uses = [(n, k) for n in epilogue for k, v in enumerate(n.inputs) if v is last_hidden]
    added: list = []
    new_inputs, new_outputs = [], []
    prev = last_hidden
    for j in range(m, n_total):
        if kinds[j] not in template:
            raise NotInstantiable(f"layer {j}'s kind has no template in the cut")
        r = template[kinds[j]]
        if hidden_in[r] is None:
            raise NotInstantiable(f"layer {r}'s input hidden state is not one value")

        def rename(name: str | None, layer: int = r, j=j) -> str | None:
            if not name:
                return name
            for pattern in (_PAST, _PRESENT):
                if (match := pattern.match(name)) and int(match.group(1)) == layer:
                    return name.replace(f".{layer}.", f".{j}.", 1)
            swapped = _swap_layer(name, layer, j)
            new = swapped if swapped != name else f"{name}__{j}"
            if new in names:
                raise NotInstantiable(f"{new} already names a value or node")
            names.add(new)
            return new

        value_map: dict = {hidden_in[r]: prev}
        for v in external(groups[r], outputs_of[r]):
            if v.is_graph_input() and (match := _PAST.match(v.name)):
                if int(match.group(1)) != r:
                    raise NotInstantiable(f"layer {r} reads the cache of layer {match.group(1)}")
                value_map[v] = ir.Value(
                    name=rename(v.name), type=v.type, shape=_copy_shape(v.shape)
                )
            elif v.is_initializer() and (i := init_layer(v)) is not None:
                if v not in weights:
                    raise NotInstantiable(f"layer {r} reads {v.name}, not a checkpoint weight")
                key, perm = weights[v]
                if i != r:
                    raise NotInstantiable(f"layer {r} reads {v.name} of layer {i}")
                key_j = _swap_layer(key, i, j)
                if key_j == key or not has_key(key_j):
                    raise NotInstantiable(f"no checkpoint tensor {key_j} for {v.name}")
                name = rename(v.name)
                new = ir.Value(
                    name=name,
                    type=v.type,
                    shape=_copy_shape(v.shape),
                    const_value=make_weight(name, key_j, perm, v.const_value),
                )
                for k, text in v.metadata_props.items():
                    new.metadata_props[k] = _swap_layer(text, i, j)
                graph.register_initializer(new)
                weights[new] = (key_j, perm)
                value_map[v] = new
            elif v is not hidden_in[r] and wdeps.get(v):
                raise NotInstantiable(f"layer {r} reads {v.name}, which depends on a layer")

        past_r = [v for v in inputs if (match := _PAST.match(v.name)) and int(match.group(1)) == r]
        if any(v not in value_map for v in past_r):
            raise NotInstantiable(f"layer {r} does not read all of its cache inputs")
        new_inputs += [value_map[v] for v in past_r]

        def finish(node, r=r, j=j, rename=rename) -> None:
            node.name = rename(node.name)
            for k, text in list(node.metadata_props.items()):
                node.metadata_props[k] = _swap_layer(text, r, j)
            for o in node.outputs:
                o.name = rename(o.name)

        cloner = Cloner(
            attr_map={},
            value_map=value_map,
            metadata_props={},
            post_process=finish,
            allow_outer_scope_values=True,
        )
        copies = [cloner.clone_node(node) for node in groups[r]]
        added += copies
        for v in outputs:
            if (match := _PRESENT.match(v.name or "")) and int(match.group(1)) == r:
                new_outputs.append(value_map[v])
        prev = value_map[hidden_out[r]]
    if epilogue:
        graph.insert_before(epilogue[0], added)
    else:
        graph.extend(added)
    for node, k in epilogue_uses:
        node.replace_input_with(k, prev)
    graph.inputs.extend(new_inputs)
    graph.outputs.extend(new_outputs)
    if not _is_sorted(graph):  # a shared value made after the final norm began
        graph.sort()
    # Equal small tensors merged, as the whole-model optimizer merges them (it reads tensors
    # of <= 1,024 elements only); the cut's weights were hidden from it (`onnx_export`).
    with unwrapped():
        DeduplicateInitializersPass()(model)
    return len(added)


# Ops whose output depends on their input's shape only, not its values.
_SHAPE_OPS = frozenset({"Shape", "Size"})
# What `instantiate` counts a value as depending on when it depends, through data, on a
# checkpoint weight of no layer (the embedding table), in place of a layer index.
_EMBEDDED = -1


def _swap_layer(text: str, r: int, j: int) -> str:
    """`text` with every `layers.r` (a whole index) written `layers.j`."""
    return re.sub(rf"(?<=layers\.){r}(?=\D|$)", str(j), text)


def _is_sorted(graph) -> bool:
    """Whether every node of `graph` comes after the producers of what it reads."""
    made = {*graph.inputs, *graph.initializers.values()}
    for node in graph:
        if any(v.producer() is not None and v not in made for v in node.inputs if v is not None):
            return False
        made.update(node.outputs)
    return True


def _copy_shape(shape):
    return shape.copy() if shape is not None else None


def _reads(node):
    """The values `node` reads: its inputs and the outer-scope values its subgraphs read."""
    seen = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        graphs = []
        if attr.type.name == "GRAPH":
            graphs = [attr.as_graph()]
        elif attr.type.name == "GRAPHS":
            graphs = list(attr.as_graphs())
        for g in graphs:
            inner = set(g.inputs) | set(g.initializers.values())
            for sub in g:
                seen += [v for v in _reads(sub) if v not in inner]
                inner |= set(sub.outputs)
    return seen
