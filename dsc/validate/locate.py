"""Find where a candidate graph departs from its reference, layer by layer.

The exporter records, on every node, the module it came from (metadata
`pkg.torch.onnx.name_scopes`, e.g.
`[..., 'model.model.layers.3', 'model.model.layers.3.mlp', ...]`).
For each module the output of its last node (in topological order) stands for the module's
output. Every such tensor that exists under the same name in both graphs is made a graph output,
both graphs run on the same inputs, and the relative error ||c - r|| / ||r|| is computed per tensor.

The error "jumps" at the tensor (in the reference's order) whose error exceeds `floor` and is
the largest multiple, at least `factor`, of every error before it: a quantizer scaled wrong in
layer 5 shows small errors up to layer 5's projection and a jump there. Routed-expert outputs
are listed but never named: a top-k choice flipped by a tiny upstream difference makes them jump
(measured: 0.01 -> 0.21 in a correct int8 graph) without being the cause. Passes keep the names
of the tensors they do not replace, so a wrong fusion shows up at the first module output after
the fused block. Tensors a quantization pass rescaled on purpose (SmoothQuant / AWQ fold 1/s into
a norm's gamma or a projection's output channels, so the value differs from the reference by
design) carry the node metadata `dsc.rescaled` and are not compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsc.node_meta import RESCALED_KEY, module_path

_LAYER = re.compile(r"layers\.(\d+)")

# Relative error below which a module output never counts as the first divergence (the report
# draws it as the threshold on the per-module error plot).
DIVERGENCE_FLOOR = 1e-2


@dataclass(frozen=True)
class TensorError:
    tensor: str
    module: str
    layer: int | None
    rel_error: float

    def to_json(self) -> dict:
        return {
            "tensor": self.tensor,
            "module": self.module,
            "layer": self.layer,
            "rel_error": self.rel_error,
        }


def module_outputs(model) -> list[tuple[str, str]]:
    """(tensor name, module path) of each module's last float output, in topological order."""
    import onnx_ir as ir

    last: dict[str, str] = {}
    order: list[str] = []
    for node in model.graph:
        path = module_path(node)
        if path is None or not node.outputs:
            continue
        out = node.outputs[0]
        if out.type is None or out.dtype not in (
            ir.DataType.FLOAT,
            ir.DataType.FLOAT16,
            ir.DataType.BFLOAT16,
        ):
            continue
        if path not in last:
            order.append(path)
        last[path] = out.name
    return [(last[p], p) for p in order]


def _feeds(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Prefill inputs for `ids` with an empty past, in this graph's own dtypes."""
    b, s = ids.shape
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((b, s), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
    }
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            heads, dim = int(v.shape[1]), int(v.shape[3])
            feeds[v.name] = np.zeros((b, heads, 0, dim), dtype=v.dtype.numpy())
    return feeds


def _run_with_outputs(onnx_path: Path, names: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    import json

    import onnx_ir as ir

    from dsc.backends.onnxruntime.runner import (
        ARENA_MAX_WEIGHT_BYTES,
        float32_view,
        graph_weight_bytes,
        inference_session,
        is_bf16,
    )

    io_path = Path(onnx_path).parent / "model_io.json"
    if graph_weight_bytes(onnx_path) > ARENA_MAX_WEIGHT_BYTES and io_path.is_file():
        # One decoder layer at a time, as the gate runs a graph of this size.
        from dsc.backends.onnxruntime.segmented import SegmentedCausalLM

        lm = SegmentedCausalLM(onnx_path, json.loads(io_path.read_text()), extra_outputs=names)
        b, s = ids.shape
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
        lm.step(ids, np.ones((b, s), dtype=np.int64), pos, lm.empty_past(b))
        return {n: lm.values[n] for n in names if n in lm.values}
    model = ir.load(str(onnx_path))
    if is_bf16(model):  # ONNX Runtime's CPU provider runs it as its float32 view
        model = float32_view(model)
    feeds = _feeds(model, ids)
    values = {v.name: v for node in model.graph for v in node.outputs}
    existing = {v.name for v in model.graph.outputs}
    wanted = [n for n in names if n in values]
    for n in wanted:
        if n not in existing:
            model.graph.outputs.append(values[n])
    # The weights are read where they are (no copy of the graph's data file is written).
    outs = inference_session(model).run(wanted, feeds)
    return dict(zip(wanted, outs, strict=False))


def _rel_error(c: np.ndarray, r: np.ndarray) -> float:
    c = np.asarray(c, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if c.shape != r.shape:
        return float("inf")
    if not np.isfinite(c).all() and np.isfinite(r).all():
        return float("inf")
    return float(np.linalg.norm(c - r) / (np.linalg.norm(r) + 1e-12))


def layer_errors(candidate: Path, reference: Path, ids: np.ndarray) -> list[TensorError]:
    """Relative error of every module output the two graphs share, in reference order."""
    import onnx_ir as ir

    ref_outputs = module_outputs(ir.load(str(reference)))
    cand_names = {
        v.name
        for node in ir.load(str(candidate)).graph
        for v in node.outputs
        if RESCALED_KEY not in node.metadata_props
    }
    shared = [(t, m) for t, m in ref_outputs if t in cand_names]
    if not shared:
        return []
    names = [t for t, _ in shared]
    ref_vals = _run_with_outputs(reference, names, ids)
    cand_vals = _run_with_outputs(candidate, names, ids)
    errors = []
    for tensor, module in shared:
        if tensor not in ref_vals or tensor not in cand_vals:
            continue
        m = _LAYER.search(module)
        errors.append(
            TensorError(
                tensor,
                module,
                int(m.group(1)) if m else None,
                _rel_error(cand_vals[tensor], ref_vals[tensor]),
            )
        )
    return errors


def _routing_sensitive(module: str, modules: set[str]) -> bool:
    """Routed-expert outputs (and the MoE block output) jump whenever a token's top-k choice
    flips on a tiny upstream difference; they amplify errors rather than cause them."""
    if ".shared_experts" in module:
        return False
    return ".experts" in module or f"{module}.experts" in modules


def first_jump(
    errors: list[TensorError], *, floor: float = DIVERGENCE_FLOOR, factor: float = 5.0
) -> TensorError | None:
    """Where the error jumps: the tensor above `floor` whose error is the largest multiple
    (at least `factor`) of every error before it; routed-expert outputs are not candidates."""
    modules = {e.module for e in errors}
    best, best_ratio = None, factor
    worst_before = 0.0
    for e in errors:
        ratio = e.rel_error / max(worst_before, floor / factor)
        if (
            e.rel_error > floor
            and ratio >= best_ratio
            and not _routing_sensitive(e.module, modules)
        ):
            best, best_ratio = e, ratio
        worst_before = max(worst_before, e.rel_error)
    return best
