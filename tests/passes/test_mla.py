"""fuse-mla: MLA key Concat, and kv_b_proj absorption for decode (If on the query length)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from dsc.passes import PassContext, PassOptions
from tests.passes.conftest import check_pass, op_count, rtx_ctx

MLA = ("deepseek_v2", "deepseek_v3")


@pytest.mark.parametrize("family", MLA)
def test_mla_absorbed_decode_and_expanded_prefill(exported, prepared, tmp_path, family):
    # Prefill (9 tokens) runs the expanded branch, the 3 decode steps the absorbed one; both
    # must equal the export.
    model = check_pass(
        exported[family], prepared[family], tmp_path, ["fuse-rotary", "fuse-mla"], pad=2
    )
    ifs = [n for n in model.graph if n.op_type == "If"]
    assert len(ifs) == 3
    assert all(n.metadata_props["dsc.block"] == "attention" for n in ifs)
    assert op_count(model, "ScatterND") == 0  # the key is a Concat now
    for node in ifs:
        absorbed = node.attributes["then_branch"].value
        expanded = node.attributes["else_branch"].value
        # decode never multiplies the cache by kv_b_proj: its only GEMMs with the latent are
        # the attention BMMs; the q / output absorptions are [H, ., .] constants.
        consts = [
            ir.convenience.get_const_tensor(n.inputs[1]) for n in absorbed if n.op_type == "MatMul"
        ]
        assert sum(c is not None and len(c.shape) == 3 for c in consts) == 2
        assert any(n.op_type == "Split" for n in expanded)  # kv_b_proj output into k_nope, v
        assert not any(n.op_type == "Split" for n in absorbed)


def test_absorbed_weights_are_the_kv_b_proj_blocks(exported, prepared):
    model = ir.load(prepared["deepseek_v3"])
    from tests.passes.conftest import run

    w_kvb = next(
        n.inputs[1].const_value.numpy()
        for n in model.graph
        if n.op_type == "MatMul" and n.inputs[0].name == "present.0.compressed_kv"
    )
    run(model, ["fuse-rotary", "fuse-mla"])
    branch = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"].value
    mats = [
        ir.convenience.get_const_tensor(n.inputs[1]).numpy()
        for n in branch
        if n.op_type == "MatMul" and ir.convenience.get_const_tensor(n.inputs[1]) is not None
    ]
    r, h = w_kvb.shape[0], 4
    w = w_kvb.reshape(r, h, -1)
    np.testing.assert_array_equal(mats[0], w[:, :, :16].transpose(1, 2, 0))  # W_uk^T [H, N, r]
    np.testing.assert_array_equal(mats[1], w[:, :, 16:].transpose(1, 0, 2))  # W_uv [H, r, V]


@pytest.mark.parametrize("family", MLA)
def test_mla_without_absorption_is_plain_mha(exported, prepared, tmp_path, family):
    ctx = rtx_ctx(mla_absorb_max_seq=0)
    model = check_pass(
        exported[family], prepared[family], tmp_path, ["fuse-mla", "fuse-attention"], ctx
    )
    assert op_count(model, "If") == 0 and op_count(model, "ScatterND") == 0
    tagged = [n for n in model.graph if n.metadata_props.get("dsc.block") == "attention"]
    assert len(tagged) == 3 and "MHA" in tagged[0].metadata_props["dsc.form"]


def test_mla_with_attention_op(exported, prepared, tmp_path):
    ctx = PassContext(None, PassOptions(target_ops="opset23"))
    model = check_pass(
        exported["deepseek_v3"],
        prepared["deepseek_v3"],
        tmp_path,
        ["fuse-rotary", "fuse-mla"],
        ctx,
        pad=2,
        padded_rows_free=True,
    )
    n_att = op_count(model, "Attention", recursive=True)
    assert n_att == 6  # absorbed (MQA over [c | k_pe]) and expanded, per layer
