"""Coverage: fused blocks per kind, 100% on every family; unfused blocks named with a reason."""

from __future__ import annotations

import json

import pytest

from dsc.passes import PassContext
from dsc.passes.coverage import coverage, expected_blocks, format_coverage
from tests.passes.conftest import FAMILIES, load, rtx_ctx, run

EXPECTED = {
    "llama": {"rmsnorm": 5, "attention": 2, "mlp": 2},
    "qwen2": {"rmsnorm": 5, "attention": 2, "mlp": 2},
    "deepseek_v2": {"rmsnorm": 10, "attention": 3, "mlp": 3, "moe": 2},
    "deepseek_v3": {"rmsnorm": 13, "attention": 3, "mlp": 3, "moe": 2},
}


def _config(artifact):
    return json.loads((artifact / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_coverage_on_every_family(optimized, family):
    artifact, path, _ = optimized[family]
    import onnx_ir as ir

    cov = coverage(ir.load(path), _config(artifact), target=rtx_ctx().target)
    assert cov["complete"], format_coverage(cov)
    for kind, n in EXPECTED[family].items():
        entry = cov["kinds"][kind]
        assert entry["blocks"] == entry["expected"] == n
        assert entry["fused"] == n and entry["percent"] == 100.0 and not entry["unfused"]


def test_expected_blocks_from_config(exported):
    assert expected_blocks(_config(exported["deepseek_v3"])) == EXPECTED["deepseek_v3"]
    assert expected_blocks(_config(exported["llama"])) == EXPECTED["llama"]


def test_unfused_blocks_are_named_with_the_reason(exported):
    artifact = exported["deepseek_v3"]
    model = load(artifact)
    run(
        model,
        [
            "fold-constants",
            "simplify",
            "cse",
            "remove-unused",
            "upgrade-opset",
            "fuse-rmsnorm",
            "fuse-mlp",
            "fuse-rotary",
        ],
    )  # no fuse-mla, no lower-moe
    cov = coverage(model, _config(artifact), target=rtx_ctx().target)
    assert not cov["complete"]
    att = cov["kinds"]["attention"]
    assert att["fused"] == 0 and len(att["unfused"]) == 3
    assert all("MlaAbsorb" in u["reason"] or "fuse-" in u["reason"] for u in att["unfused"])
    moe = cov["kinds"]["moe"]
    assert len(moe["unfused"]) == 2 and "lower-moe would fuse it" in moe["unfused"][0]["reason"]
    text = format_coverage(cov)
    assert "not fused: " in text and "attention 0/3" in text


def test_rmsnorm_kept_in_target_form_on_portable_target(exported):
    artifact = exported["llama"]
    model = load(artifact)
    ctx = PassContext()
    run(model, ["fold-constants", "simplify", "fuse-rmsnorm"], ctx)
    entry = coverage(model, _config(artifact), target=ctx.target)["kinds"]["rmsnorm"]
    assert entry["fused"] == 0 and entry["kept"] == 5 and entry["percent"] == 100.0
