"""fuse-rotary: the three exported RoPE forms become RotaryEmbedding (opset 23)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from dsc.passes import PassContext, PassOptions
from tests.passes.conftest import FAMILIES, check_pass, op_count, run

EXPECTED = {"llama": 4, "qwen2": 4, "deepseek_v2": 6, "deepseek_v3": 6}  # q and k per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_fusion(exported, prepared, tmp_path, family):
    model = check_pass(exported[family], prepared[family], tmp_path, ["fuse-rotary"])
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == EXPECTED[family]
    assert op_count(model, "Neg") == 0 and op_count(model, "Sin") <= 1
    # TensorRT-RTX target: no interleaved=1 (see TargetOps.rotary_interleaved)
    assert all(n.attributes["interleaved"].value == 0 for n in ropes)


def test_v2_interleaved_form_for_targets_that_take_it(exported, prepared, tmp_path):
    ctx = PassContext(None, PassOptions(target_ops="opset23"))
    model = check_pass(
        exported["deepseek_v2"], prepared["deepseek_v2"], tmp_path, ["fuse-rotary"], ctx
    )
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(ropes) == 6 and all(n.attributes["interleaved"].value == 1 for n in ropes)


def test_rotary_not_emitted_for_portable_target(prepared):
    model = ir.load(prepared["qwen2"])
    assert not run(model, ["fuse-rotary"], PassContext()).passes[0].modified
    assert op_count(model, "RotaryEmbedding") == 0
