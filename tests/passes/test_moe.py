"""lower-moe: routed experts as a dense two-GEMM form (gather kept for decode), any routing."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tests.passes.conftest import check_pass, load, op_count, rtx_ctx, run

MOE = ("deepseek_v2", "deepseek_v3")


def _expert_gathers(model: ir.Model) -> int:
    return sum(
        1
        for n in model.graph
        if n.op_type == "GatherND"
        and n.inputs[0].const_value is not None
        and len(n.inputs[0].shape) == 3
    )


@pytest.mark.parametrize("family", MOE)
def test_moe_lowering(exported, prepared, tmp_path, family):
    # prefill: 18 tokens x top-2 >= 16 experts → dense; decode: 2 x 2 < 16 → gather
    model = check_pass(exported[family], prepared[family], tmp_path, ["lower-moe"])
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert len(ifs) == 2 and all(n.metadata_props["dsc.block"] == "moe" for n in ifs)
    assert _expert_gathers(model) == 0
    dense = ifs[0].attributes["else_branch"].value
    assert [n.op_type for n in dense].count("MatMul") == 2  # the two GEMMs


def _routed_subgraph(artifact) -> ir.Model:
    """The first MoE layer's routed experts of the export, with routing as graph inputs."""
    from dsc.passes.fusion.moe import MoeLowering

    model = load(artifact)
    run(model, ["fold-constants", "simplify", "cse", "remove-unused"])
    rule = MoeLowering.rule(True)
    for node in model.graph:
        if node.op_type == "ReduceSum":
            match = rule.match(model, model.graph, node)
            if match:
                break
    b = match.bindings
    graph = ir.convenience.extract(
        model.graph, inputs=[b["x"], b["idx"], b["wts"]], outputs=[node.outputs[0]]
    )
    graph.opset_imports.update(model.opset_imports)
    return ir.Model(graph, ir_version=model.ir_version)


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString()).run(None, feeds)[0]


@pytest.mark.parametrize("family", MOE)
def test_every_routing(exported, family):
    """All 16*15 ordered expert pairs as routings (dense branch: 240 tokens) and, in groups of
    3 tokens, every expert through the gather branch: equal to the exported experts."""
    sub = _routed_subgraph(exported[family])
    x_value, idx_value, w_value = sub.graph.inputs
    experts, dim = 16, x_value.shape[1] if isinstance(x_value.shape[1], int) else 64
    pairs = np.array(list(itertools.permutations(range(experts), 2)), dtype=np.int64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(pairs), dim)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, pairs.shape).astype(np.float32)
    ref = _run(sub, {x_value.name: x, idx_value.name: pairs, w_value.name: w})
    lowered = ir.from_proto(ir.to_proto(sub))
    run(lowered, ["lower-moe"], rtx_ctx())
    assert op_count(lowered, "If") == 1
    got = _run(lowered, {x_value.name: x, idx_value.name: pairs, w_value.name: w})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)
    for start in range(0, experts, 3):  # 3 tokens x 2 = 6 slots < 16 experts: gather branch
        sel = np.array([[e % experts, (e + 1) % experts] for e in range(start, start + 3)])
        feeds = {x_value.name: x[:3], idx_value.name: sel, w_value.name: w[:3]}
        np.testing.assert_allclose(_run(lowered, feeds), _run(sub, feeds), atol=1e-4, rtol=1e-5)


def test_dense_only(exported, prepared, tmp_path):
    model = check_pass(
        exported["deepseek_v3"],
        prepared["deepseek_v3"],
        tmp_path,
        ["lower-moe"],
        rtx_ctx(moe_gather_decode=False),
    )
    assert op_count(model, "If") == 0 and _expert_gathers(model) == 0
    tagged = [n for n in model.graph if n.metadata_props.get("dsc.block") == "moe"]
    assert len(tagged) == 2 and tagged[0].metadata_props["dsc.form"] == "dense two-GEMM"
