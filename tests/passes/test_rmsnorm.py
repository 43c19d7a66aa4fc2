"""fuse-rmsnorm: RMSNormalization where the target parses it; kept decomposed elsewhere."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dsc.passes import PassContext
from tests.passes.conftest import FAMILIES, check_pass, op_count, run

EXPECTED = {"llama": 5, "qwen2": 5, "deepseek_v2": 10, "deepseek_v3": 13}


@pytest.mark.parametrize("family", FAMILIES)
def test_rmsnorm_fusion(exported, prepared, tmp_path, family):
    model = check_pass(exported[family], prepared[family], tmp_path, ["fuse-rmsnorm"])
    assert op_count(model, "RMSNormalization") == EXPECTED[family]
    assert op_count(model, "ReduceMean") == 0 and op_count(model, "Reciprocal") == 0
    assert model.opset_imports[""] == 23  # upgraded by the pass itself (run alone)
    node = next(n for n in model.graph if n.op_type == "RMSNormalization")
    assert node.attributes["stash_type"].value == 1 and node.attributes["axis"].value == -1


def test_rmsnorm_left_decomposed_without_target_support(prepared):
    model = ir.load(prepared["llama"])
    report = run(model, ["fuse-rmsnorm"], PassContext())
    assert not report.passes[0].modified and "left decomposed" in report.passes[0].notes[0]
    assert op_count(model, "RMSNormalization") == 0 and op_count(model, "ReduceMean") == 5


def _fp16_rmsnorm_graph():
    """HF's fp16 RMSNorm: Cast to fp32, normalise, Cast back, times the fp16 weight."""
    n = helper.make_node
    nodes = [
        n("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        n("Pow", ["xf", "two"], ["sq"]),
        n("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        n("Add", ["ms", "eps"], ["mse"]),
        n("Sqrt", ["mse"], ["rms"]),
        n("Reciprocal", ["rms"], ["inv"]),
        n("Mul", ["xf", "inv"], ["norm"]),
        n("Cast", ["norm"], ["normh"], to=TensorProto.FLOAT16),
        n("Mul", ["w", "normh"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        numpy_helper.from_array(np.linspace(0.5, 1.5, 32).astype(np.float16), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "rms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3, 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def test_rmsnorm_fp16_pattern_with_casts():
    from tests.passes.conftest import rtx_ctx

    proto = _fp16_rmsnorm_graph()
    x = (np.random.default_rng(0).standard_normal((2, 3, 32)) * 3).astype(np.float16)
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    model = ir.serde.deserialize_model(proto)
    run(model, ["fuse-rmsnorm"], rtx_ctx())
    assert [n.op_type for n in model.graph] == ["RMSNormalization"]
    assert model.graph.node(0).attributes["stash_type"].value == 1  # computed in fp32
    got = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString()).run(
        None, {"x": x}
    )[0]
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=2e-3)
