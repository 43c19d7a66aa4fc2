"""fuse-attention: canonical GQA (fp32 on TensorRT-RTX) or the opset-23 Attention op."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from dsc.passes import PassContext, PassOptions
from tests.passes.conftest import check_pass, op_count

GQA = ("llama", "qwen2")


@pytest.mark.parametrize("family", GQA)
def test_canonical_gqa_drops_the_kv_repeat(exported, prepared, tmp_path, family):
    before = ir.load(prepared[family])
    model = check_pass(exported[family], prepared[family], tmp_path, ["fuse-attention"], pad=3)
    tagged = [n for n in model.graph if n.metadata_props.get("dsc.block") == "attention"]
    assert len(tagged) == 2 and all(n.op_type == "Softmax" for n in tagged)
    assert "GQA" in tagged[0].metadata_props["dsc.form"]
    # K/V were repeated by Expand (2 per layer); now never.
    assert op_count(model, "Expand") == op_count(before, "Expand") - 4
    assert op_count(model, "IsNaN") == 0  # the guard is Where(any(mask)) after the 2nd BMM
    assert op_count(model, "Attention") == 0  # fp32: TensorRT-RTX's IAttention has no kernel


@pytest.mark.parametrize("family", GQA)
def test_attention_op_where_the_target_takes_it(exported, prepared, tmp_path, family):
    ctx = PassContext(None, PassOptions(target_ops="opset23"))
    # Padding rows: ORT's Attention gives 0 where the export averages uniformly; no real token
    # reads them, and the rest must match.
    model = check_pass(
        exported[family],
        prepared[family],
        tmp_path,
        ["fuse-attention"],
        ctx,
        pad=3,
        padded_rows_free=True,
    )
    atts = [n for n in model.graph if n.op_type == "Attention"]
    assert len(atts) == 2 and op_count(model, "Softmax") == 0
    # GQA natively: K and V go in with their 2 kv heads, not repeated to 4.
    assert all(n.inputs[1].name.startswith("present.") for n in atts)
    assert all(abs(n.attributes["scale"].value - 0.25) < 1e-6 for n in atts)  # 1/sqrt(16)
