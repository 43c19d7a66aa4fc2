"""Calibration one decoder layer at a time ("sequential onloading", as llm-compressor and
ModelOpt do it for PyTorch models; here on the ONNX graph).

The graph is cut into segments: the nodes before the first decoder layer (embedding, rotary
tables, masks), then one segment per layer (`layers.<i>` in the exporter's module scopes;
the final norm and lm_head join the last layer). A node without a layer joins the latest
segment among its inputs' producers, so every edge runs forward. Each segment becomes a graph
of its own whose inputs are the values it reads from earlier segments (the hidden state, the
rotary tables, the mask) and whose outputs are the values later segments read, plus the
calibration exposures it produces.

`collect_layerwise` runs every calibration batch through one segment in an ONNX Runtime session
holding only that segment's weights, keeps what later segments read (per batch: the hidden
state and the shared tables, [batch, seq, hidden] each; an fp16 value is carried as float32,
see `SegmentPlan.subgraph`), drops the session and goes on. Resident: one layer's weights (plus
ONNX Runtime's fp32 copies of them on the CPU), not the model's. Each accumulator sees the
batches in the order the whole-graph collector (`dsc.passes.quant.calibrate.collect`) gives
them, so the statistics are that collector's: bit for bit on fp32 graphs and on the tiny V3 in
fp16, within 2e-3 relative (1.0e-3 measured, the tiny Qwen2 in fp16 for Jetson Orin) where
ONNX Runtime keeps an fp16 value in float32 inside one graph but rounds it at a segment's
edge (tests/test_layerwise_calibration.py).

If nodes (MLA absorbed vs expanded, MoE gather vs dense) are inlined per batch as the whole-graph
collector does: a segment runs with the branches its batch takes, read from the conditions the
graph computes. A condition computed in the segment it decides is computed first, by a session
of the few shape operators it needs (`_condition_probe`), so no batch ever runs a branch it does
not take (MoE's gather branch at prefill size would copy one expert matrix per token).
"""

from __future__ import annotations

import re
import time

import numpy as np
import onnx

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(node) -> int | None:
    """The decoder layer a NodeProto came from (its innermost `layers.<i>` scope), or None."""
    from dsc.node_meta import SCOPE_KEY

    raw = next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), None)
    if not raw:
        return None
    found = _LAYER.findall(raw)
    return int(found[-1]) if found else None


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    refs: set[str] = set()
    for n in graph.node:
        for name in n.input:
            if name and name not in local:
                refs.add(name)
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                refs |= _outer_refs(g) - local
        local.update(n.output)
    return refs


def reads(node) -> list[str]:
    """Every value `node` reads: its inputs and what its subgraphs read from outside."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            names.extend(sorted(_outer_refs(g)))
    return names


def wide(name: str) -> str:
    """The name an fp16 value is carried under between segments, as float32."""
    return f"{name}__dsc_f32"


def _condition_probe(plan, proto, k: int, types, feeds, conds, ifs) -> onnx.ModelProto:
    """Segment k's subgraph cut down to the conditions of its own If nodes `ifs` (If output ->
    condition name in `conds`): its outputs are those conditions only, every node they do not
    depend on dropped (for MoE's If, `N*k < E`, a few shape operators), so it runs no branch."""
    sub = plan.subgraph(proto, k, sorted(plan.carry[k]), types, feeds)
    del sub.graph.output[:]
    for name in dict.fromkeys(conds[o] for o in ifs):
        sub.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None)
        )
    prune_dead(sub)
    return sub


def prune_dead(proto: onnx.ModelProto) -> int:
    """Drop the nodes no graph output depends on, and the initializers only they read (in
    place); returns how many nodes went. ONNX Runtime runs every node of a session, wanted or
    not: a calibration segment asks only for its activations and carried values, and without
    this the last one ran lm_head (at R1-Distill-Qwen-7B its 1.09 GB fp16 weight, cast to
    float32 on the CPU provider, and [batch, 128, 152,064] float32 logits) for nothing."""
    g = proto.graph
    need = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in need for o in n.output if o):
            keep.append(n)
            need.update(reads(n))
    removed = len(g.node) - len(keep)
    if removed:
        keep.reverse()
        del g.node[:]
        g.node.extend(keep)
        inits = [t for t in g.initializer if t.name in need]
        del g.initializer[:]
        g.initializer.extend(inits)
    return removed


class SegmentPlan:
    """The graph cut into segments (see the module docstring). `segments[k]`: node indices of
    segment k (k = 0: before the first layer; k = i + 1: layer i); `inputs[k]`: values segment
    k reads from earlier segments or the graph inputs; `carry[k]`: values segment k produces
    that a later segment reads. A constant node (one that reads only initializers and other
    constant nodes' outputs) is in the segment of its first reader, so a weight's
    DequantizeLinear runs with the layer that reads it and no weight crosses segments."""

    def __init__(self, proto: onnx.ModelProto):
        g = proto.graph
        inits = {t.name for t in g.initializer}
        seg_of_value: dict[str, int] = {}
        seg_of_node: list[int] = []
        node_reads = [reads(n) for n in g.node]
        # Constant nodes (reading only initializers and other constant nodes' outputs: a
        # weight's DequantizeLinear, a Transpose or Reshape of a weight, a Constant) go with
        # their first reader, not where their scope puts them: a quantized graph's weight
        # DequantizeLinear nodes carry no layer scope, and in segment 0 they dequantized every
        # weight of the model there and carried it, in float32, to its layer (6 GB at 1.5B).
        const_values = set(inits)
        const = []
        for n, read in zip(g.node, node_reads, strict=True):
            is_const = all(name in const_values for name in read) and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for a in n.attribute
            )
            const.append(is_const)
            if is_const:
                const_values.update(o for o in n.output if o)
        for i, n in enumerate(g.node):
            layer = layer_of(n)
            seg = 0 if layer is None or const[i] else layer + 1
            for name in node_reads[i]:
                seg = max(seg, seg_of_value.get(name, 0))
            seg_of_node.append(seg)
            for o in n.output:
                seg_of_value[o] = seg
        readers: dict[str, list[int]] = {}
        for i, read in enumerate(node_reads):
            for name in read:
                readers.setdefault(name, []).append(i)
        for i in reversed(range(len(g.node))):
            if const[i]:
                first = [seg_of_node[j] for o in g.node[i].output for j in readers.get(o, ())]
                layer = layer_of(g.node[i])
                seg_of_node[i] = min(first, default=0 if layer is None else layer + 1)
                for o in g.node[i].output:
                    seg_of_value[o] = seg_of_node[i]
        count = max(seg_of_node, default=0) + 1
        self.segments: list[list[int]] = [[] for _ in range(count)]
        for i, s in enumerate(seg_of_node):
            self.segments[s].append(i)
        self.inputs: list[list[str]] = [[] for _ in range(count)]
        self.carry: list[set[str]] = [set() for _ in range(count)]
        self.last_use: dict[str, int] = {}
        for i, read in enumerate(node_reads):
            s = seg_of_node[i]
            for name in dict.fromkeys(read):
                if name in inits:
                    continue
                src = seg_of_value.get(name)
                if src is None or src < s:  # a graph input, or an earlier segment's value
                    if name not in self.inputs[s]:
                        self.inputs[s].append(name)
                    if src is not None:
                        self.carry[src].add(name)
                    self.last_use[name] = max(self.last_use.get(name, 0), s)
        self.seg_of_value = seg_of_value
        self.initializer_names = inits

    def __len__(self) -> int:
        return len(self.segments)

    def subgraph(
        self,
        proto: onnx.ModelProto,
        k: int,
        outputs: list[str],
        types: dict[str, int],
        feeds: dict | None = None,
    ) -> onnx.ModelProto:
        """Segment `k` as a model of its own: its nodes, the initializers they read, its
        inputs and `outputs` (typed from `types`: value name -> TensorProto element type; an
        input the graph does not type takes the dtype of its array in `feeds`, an output is
        left untyped for ONNX Runtime to infer).

        An fp16 value crossing segments is carried as float32 (`wide(name)`: a Cast after
        its producer, a Cast back before its readers): ONNX Runtime's CPU provider computes
        fp16 ops in float32 and drops the fp16 round trip between two such ops, so inside
        one graph the value is not rounded to fp16 there; carried in fp16 it would be (the
        tiny V3's MoE statistics then differed by 1e-3 relative; carried so, not at all)."""
        from onnx import helper

        g = proto.graph
        nodes = [g.node[i] for i in self.segments[k]]
        read = {name for n in nodes for name in reads(n)}
        graph_inputs = {i.name: i for i in g.input}
        half = onnx.TensorProto.FLOAT16

        def info(name, elem=None, output=False):
            if name in graph_inputs:
                return graph_inputs[name]
            elem = elem or types.get(name, 0)
            if not elem and not output and feeds is not None and name in feeds:
                elem = helper.np_dtype_to_tensor_dtype(np.asarray(feeds[name]).dtype)
            if not elem:
                return helper.make_empty_tensor_value_info(name)
            return helper.make_tensor_value_info(name, elem, None)

        inputs, outs, head, tail = [], [], [], []
        for name in self.inputs[k]:
            if name not in graph_inputs and types.get(name) == half:
                inputs.append(info(wide(name), onnx.TensorProto.FLOAT))
                head.append(helper.make_node("Cast", [wide(name)], [name], to=half))
            else:
                inputs.append(info(name))
        for name in outputs:
            if name in self.carry[k] and types.get(name) == half:
                outs.append(info(wide(name), onnx.TensorProto.FLOAT))
                tail.append(
                    helper.make_node("Cast", [name], [wide(name)], to=onnx.TensorProto.FLOAT)
                )
            else:
                outs.append(info(name, output=True))
        sub = helper.make_graph(
            [*head, *nodes, *tail],
            f"{g.name}_segment{k}",
            inputs,
            outs,
            [t for t in g.initializer if t.name in read],
        )
        model = helper.make_model(
            sub, opset_imports=list(proto.opset_import), ir_version=proto.ir_version
        )
        model.functions.extend(proto.functions)
        return model


def collect_layerwise(
    proto: onnx.ModelProto,
    base_dir,
    io: dict,
    windows: np.ndarray,
    *,
    sources: list[list[str]],
    idx_names: list[str],
    conds: dict[str, str],
    vals: dict,
    batch: int,
    threads: int | None,
    on_batch,
    on_segment=None,
    progress=None,
) -> None:
    """Run `windows` [N, L] through `proto` one segment at a time.

    For each batch, in order, `on_batch(b, {name: array})` receives what the whole-graph
    collector exposes: for each target the first of its `sources` the inlined graph has, and
    the router indices `idx_names`. `conds`: If output -> condition value name; `vals`: the
    model's values by name (for output types). Per value, the batches arrive in order, so the
    caller's accumulators end as the whole-graph run leaves them. `on_segment(k)`, if given, is
    called once segment k has run every batch (no later batch brings a value it produced)."""
    from dsc.backends.onnxruntime.runner import inference_session
    from dsc.passes.quant.exposure import (
        _expose,
        _feeds,
        exposed_activations,
        inline_branches,
    )

    t0 = time.perf_counter()
    plan = SegmentPlan(proto)
    types = {n: v.dtype.value for n, v in vals.items() if v.dtype is not None}
    seg_ifs: list[list[str]] = [[] for _ in range(len(plan))]
    for k, idxs in enumerate(plan.segments):
        for i in idxs:
            n = proto.graph.node[i]
            if n.op_type == "If" and n.domain in ("", "ai.onnx") and n.output[0] in conds:
                seg_ifs[k].append(n.output[0])
    cond_names = list(dict.fromkeys(conds.values()))
    starts = list(range(0, windows.shape[0], batch))
    store = [_feeds(io, windows[s : s + batch]) for s in starts]
    known: list[dict[str, bool]] = [{} for _ in starts]  # per batch: condition -> value
    acts_of: dict[tuple, list[str]] = {}

    def exposed(taken: dict[str, bool]) -> list[str]:
        """The activation names the whole-graph collector exposes for these branches."""
        key = tuple(sorted(taken.items()))
        if key not in acts_of:
            acts_of[key] = exposed_activations(inline_branches(proto, taken), sources)
        return acts_of[key]

    guess: dict[str, bool] = {}
    total, done = len(plan) * len(starts), 0
    for k in range(len(plan)):
        sessions: dict[tuple, tuple] = {}
        probe = None  # this segment's own If conditions, computed without running any branch
        for b in range(len(starts)):
            own = [conds[o] for o in seg_ifs[k] if conds[o] not in known[b]]
            if own:
                # Learn them before running a branch: a wrong guess runs the other branch on
                # this batch first, and MoE's gather branch (decode's) at prefill size copies
                # one expert matrix per token-slot (V2-Lite, 512 tokens: 53 GB, bad_alloc).
                if probe is None:
                    probe = _condition_probe(plan, proto, k, types, store[b], conds, seg_ifs[k])
                    probe = (probe, inference_session(probe, base_dir=base_dir, threads=threads))
                sub, sess = probe
                names = [o.name for o in sub.graph.output]
                feeds = {i.name: store[b][i.name] for i in sess.get_inputs()}
                known[b].update(
                    (c, bool(v)) for c, v in zip(names, sess.run(names, feeds), strict=True)
                )
            # Branches of Ifs in later segments are only guessed (the activation names the
            # whole-graph collector exposes depend on them); this segment's are known.
            taken = {o: known[b].get(c, guess.get(o, True)) for o, c in conds.items()}
            key = tuple(sorted((o, taken[o]) for o in seg_ifs[k]))
            acts = exposed(taken)
            if key not in sessions:
                sub = plan.subgraph(proto, k, sorted(plan.carry[k]), types, store[b])
                sub = inline_branches(sub, {o: taken[o] for o in seg_ifs[k]})
                produced = {o for n in sub.graph.node for o in n.output}
                want = [n for n in [*acts, *idx_names, *cond_names] if n in produced]
                _expose(sub, want, vals)
                prune_dead(sub)
                outs = [o.name for o in sub.graph.output]
                sess = inference_session(sub, base_dir=base_dir, threads=threads)
                sessions[key] = (sess, outs, {i.name for i in sess.get_inputs()})
            sess, outs, inputs = sessions[key]
            res = dict(
                zip(
                    outs,
                    sess.run(outs, {n: v for n, v in store[b].items() if n in inputs}),
                    strict=False,
                )
            )
            for c in cond_names:
                if c in res:
                    known[b][c] = bool(res[c])
            # This segment's own conditions were known before it ran (the probe above), so no
            # guess chose a branch here; the segment computes them again, and must agree.
            if any(known[b][conds[o]] != taken[o] for o in seg_ifs[k]):
                raise RuntimeError(
                    f"layer-wise calibration: segment {k} took a branch its own condition "
                    "does not select (the condition probe and the segment disagree)"
                )
            carried = {n for c in plan.carry[k] for n in (c, wide(c))}
            store[b].update((n, res[n]) for n in res if n in carried)
            keep = set(acts) | set(idx_names)
            on_batch(b, {n: res[n] for n in outs if n in keep})
            guess = {o: known[b].get(c, guess.get(o, True)) for o, c in conds.items()}
            done += 1
        if progress:
            eta = (time.perf_counter() - t0) / done * (total - done)
            progress(
                f"calibration, one layer at a time: segment {k + 1}/{len(plan)}"
                + (f", about {eta:.0f}s left" if done < total else "")
            )
        del sessions
        if on_segment is not None:
            on_segment(k)
        for st in store:  # drop what no later segment reads
            for name in [n for n in st if plan.last_use.get(n.removesuffix("__dsc_f32"), -1) <= k]:
                del st[name]
