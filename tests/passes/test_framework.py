"""The pass framework: registry, pipeline order, context, runner report, dump-after, verify-each."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from dsc.errors import BadInput, CheckFailed
from dsc.hardware import load_profile
from dsc.passes import (
    PIPELINE,
    DscPass,
    PassContext,
    PassOptions,
    build_pipeline,
    get_pass,
    list_passes,
    register_pass,
    run_pipeline,
    target_ops,
)
from dsc.passes._target import OPSET23, PORTABLE, RTX_1_7
from tests.passes.conftest import load, rtx_ctx


def test_every_pipeline_pass_is_registered_with_a_doc():
    names = [p.name for p in list_passes()]
    assert names[: len(dict.fromkeys(PIPELINE))] == list(dict.fromkeys(PIPELINE))
    for p in list_passes():
        assert p.doc and p.kind in ("cleanup", "fusion", "lowering", "opset", "precision")
    for fusion in (
        "fuse-rmsnorm",
        "fuse-mlp",
        "fuse-rotary",
        "fuse-mla",
        "fuse-attention",
        "lower-moe",
    ):
        assert fusion in names


def test_unknown_pass_is_bad_input():
    with pytest.raises(BadInput, match="unknown pass 'fuse-everything'"):
        get_pass("fuse-everything")
    with pytest.raises(BadInput):
        build_pipeline(PassContext(), disable=["nope"])


def test_build_pipeline_only_and_disable():
    ctx = PassContext()
    assert [n for n, _ in build_pipeline(ctx)] == list(PIPELINE)
    assert [n for n, _ in build_pipeline(ctx, only=["cse", "simplify"])] == ["cse", "simplify"]
    names = [n for n, _ in build_pipeline(ctx, disable=["fuse-mla", "cse"])]
    assert "fuse-mla" not in names and "cse" not in names and "fuse-attention" in names
    # Passes are onnx_ir passes built with the context.
    for _, p in build_pipeline(ctx):
        assert isinstance(p, ir.passes.PassBase)


def test_context_is_frozen_and_options_are_checked():
    ctx = PassContext(load_profile("rtx-4090"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.profile = None  # type: ignore[misc]
    with pytest.raises(BadInput):
        PassOptions(target_ops="everything")
    with pytest.raises(BadInput):
        PassOptions(mla_absorb_max_seq=-1)


@pytest.mark.parametrize(
    "profile,expected",
    [
        (None, PORTABLE),
        ("rtx-4090", RTX_1_7),
        ("a100-80gb", RTX_1_7),
        ("l4", RTX_1_7),
    ],
)
def test_target_ops_from_profile(profile, expected):
    hw = load_profile(profile) if profile else None
    assert target_ops(hw) == expected


def test_target_ops_for_standard_tensorrt():
    orin = target_ops(load_profile("jetson-orin-nano-8gb"))  # TensorRT 10.3: nothing new
    assert not orin.needs_opset23
    h100 = target_ops(load_profile("h100-sxm"))  # TensorRT 11.4, built on the device
    assert h100.rotary_embedding and h100.attention_for("float16", 128)
    assert not h100.rms_normalization and not h100.attention_for("float32", 128)
    assert target_ops(None, "opset23") == OPSET23 and OPSET23.attention_for("float32", 576)
    assert not RTX_1_7.attention_for("float16", 512)  # IAttention: head size <= 256


def test_runner_reports_time_nodes_and_counts(exported, tmp_path):
    model = load(exported["llama"])
    report = run_pipeline(model, rtx_ctx(), dump_after=["fuse-rmsnorm"], dump_dir=tmp_path)
    data = report.to_json()
    assert [p["name"] for p in data["passes"]] == list(PIPELINE)
    assert data["nodes_after"] < data["nodes_before"]
    by_name = {p["name"]: p for p in data["passes"]}
    assert by_name["fuse-rmsnorm"]["counts"] == {"RmsNorm": 5}
    assert by_name["fuse-rmsnorm"]["nodes_after"] < by_name["fuse-rmsnorm"]["nodes_before"]
    assert all(p["seconds"] >= 0 for p in data["passes"])
    assert report.counts()["Attention"] == 2
    index = list(PIPELINE).index("fuse-rmsnorm")
    assert len(report.dumps) == 1
    assert (tmp_path / f"after-{index:02d}-fuse-rmsnorm.onnx").is_file()
    assert report.modified


def test_dump_after_needs_a_pass_in_the_pipeline(exported, tmp_path):
    with pytest.raises(BadInput, match="fuse-mla"):
        run_pipeline(
            load(exported["llama"]),
            rtx_ctx(),
            only=["cse"],
            dump_after=["fuse-mla"],
            dump_dir=tmp_path,
        )


class _BreakLogits(DscPass):
    """A deliberately wrong pass: scales the lm_head weight."""

    def call(self, model):
        last = [n for n in model.graph if n.op_type == "MatMul"][-1]
        w = last.inputs[1]
        w.const_value = ir.tensor(w.const_value.numpy() * 1.5)
        return ir.passes.PassResult(model, True)


def test_verify_each_names_the_pass_that_changed_outputs(exported):
    register_pass("test-break-logits", _BreakLogits, "test only: breaks the logits")
    model = load(exported["llama"])
    with pytest.raises(CheckFailed, match="pass test-break-logits changed the outputs"):
        run_pipeline(
            model,
            rtx_ctx(),
            only=["simplify", "fuse-rmsnorm", "test-break-logits"],
            verify_each=True,
        )


def test_verify_each_passes_on_the_default_pipeline(exported):
    report = run_pipeline(load(exported["qwen2"]), rtx_ctx(), verify_each=True)
    checked = [p for p in report.passes if p.verify_max_abs is not None]
    assert checked and max(p.verify_max_abs for p in checked) < 1e-5
    assert np.isfinite([p.verify_max_abs for p in checked]).all()
