"""fuse-mlp: gate and up projections become one GEMM + Split; SiLU and down untouched."""

from __future__ import annotations

import pytest

from tests.passes.conftest import FAMILIES, check_pass, op_count

# dense MLPs + MoE shared experts (the routed experts are lower-moe's)
EXPECTED = {"llama": 2, "qwen2": 2, "deepseek_v2": 3, "deepseek_v3": 3}


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_fusion(exported, prepared, tmp_path, family):
    import onnx_ir as ir

    before = ir.load(prepared[family])
    model = check_pass(exported[family], prepared[family], tmp_path, ["fuse-mlp"])
    n = EXPECTED[family]
    assert op_count(model, "MatMul") == op_count(before, "MatMul") - n
    fused = [node for node in model.graph if node.metadata_props.get("dsc.block") == "mlp"]
    assert len(fused) == n
    for silu in fused:  # g * Sigmoid(g), g from Split(MatMul(x, [Wg | Wu]))
        split = silu.inputs[0].producer()
        assert split.op_type == "Split" and split.inputs[0].producer().op_type == "MatMul"
        w = split.inputs[0].producer().inputs[1].const_value
        assert w.shape[1] == 2 * split.outputs[0].shape[-1] if split.outputs[0].shape else True
