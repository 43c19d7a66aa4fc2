"""What calibration exposes of a graph: its prefill inputs, the taken If branches inlined, and
the activations made graph outputs. Shared by the whole-graph collector
(`dsc.passes.quant.calibrate`) and the layer-wise one (`dsc.passes.quant.layerwise`)."""

from __future__ import annotations

import numpy as np


def _feeds(io: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    from dsc.backends.onnxruntime.runner import ort_dtype

    b, n = ids.shape
    cache = io["cache"]
    dt = ort_dtype(cache["dtype"])  # a bf16 graph runs as its float32 view
    feeds = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, n), np.int64),
        "position_ids": np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy(),
    }
    names = iter(cache["inputs"])
    for _ in range(int(cache["num_layers"])):
        for e in cache["entries"]:
            feeds[next(names)] = np.zeros((b, e["heads"], 0, e["dim"]), dt)
    return feeds


def exposed_activations(proto, sources: list[list[str]]) -> list[str]:
    """For each target, the first of its `sources` (the activation, then the values it
    copies) that `proto` (the graph with its branches inlined) has, without repeats."""
    have = (
        {i.name for i in proto.graph.input}
        | {i.name for i in proto.graph.initializer}
        | {o for n in proto.graph.node for o in n.output}
    )
    first = (next((s for s in src if s in have), "") for src in sources)
    return [s for s in dict.fromkeys(first) if s]


def inline_branches(proto, taken: dict[str, bool]):
    """A copy of `proto` where each main-graph If in `taken` (keyed by its first output; True:
    then) is replaced by the nodes of the branch it takes, every value name kept, its outputs
    Identity copies of the branch's. ONNX Runtime cannot expose values inside a branch; in this
    copy they are ordinary graph values, computed exactly as the If would on these inputs."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    nodes = []
    for n in g.node:
        if n.op_type != "If" or n.domain not in ("", "ai.onnx") or n.output[0] not in taken:
            nodes.append(n)
            continue
        want = "then_branch" if taken[n.output[0]] else "else_branch"
        br = next(a.g for a in n.attribute if a.name == want)
        nodes.extend(br.node)
        g.initializer.extend(br.initializer)
        g.value_info.extend(br.value_info)
        for o_if, o_br in zip(n.output, br.output, strict=False):
            nodes.append(
                helper.make_node(
                    "Identity", [o_br.name], [o_if], name=f"{n.name or o_if}/inlined/{o_if}"
                )
            )
    del g.node[:]
    g.node.extend(nodes)
    return out


def _expose(proto, names, vals) -> None:
    """Add `names` to the graph outputs (typed from `vals`, the model's values, when known)."""
    import onnx

    present = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(names):
        if name in present:
            continue
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        v = vals.get(name)
        if v is not None and v.dtype is not None:
            proto.graph.output[-1].type.tensor_type.elem_type = v.dtype.value
        present.add(name)
