"""Cleanup passes: what they remove, that a second run changes nothing, ORT equal, every family."""

from __future__ import annotations

import pytest

from tests.passes.conftest import (
    CLEANUP,
    FAMILIES,
    compare_ort,
    load,
    op_count,
    run,
    save,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_cleanup_pipeline(exported, tmp_path, family):
    model = load(exported[family])
    before = len(model.graph)
    report = run(model, [*CLEANUP, "shape-inference", "topo-sort"])
    assert len(model.graph) < before
    # The exported k.transpose(-2, -1) (Reshape → Transpose(0,2,1) → Reshape) is one Transpose.
    simplify = next(p for p in report.passes if p.name == "simplify")
    assert simplify.modified and simplify.counts["rewrites"] >= 2
    perms = [tuple(n.attributes["perm"].value) for n in model.graph if n.op_type == "Transpose"]
    assert (0, 1, 3, 2) in perms
    # (a Transpose(0,2,1) of its own may stay: transformers 5.18-5.23 transpose RoPE's freqs)
    chains = [
        n
        for n in model.graph
        if n.op_type == "Transpose"
        and tuple(n.attributes["perm"].value) == (0, 2, 1)
        and n.inputs[0].producer() is not None
        and n.inputs[0].producer().op_type == "Reshape"
        and all(u.node.op_type == "Reshape" for u in n.outputs[0].uses())
    ]
    assert not chains, [n.name for n in chains]
    for name in CLEANUP:  # each pass, run again right after itself, changes nothing
        run(model, [name])
        assert not run(model, [name]).passes[0].modified, name
    compare_ort(exported[family], save(model, tmp_path / "model.onnx"))


def test_cse_and_remove_unused(exported):
    model = load(exported["llama"])
    import onnx_ir as ir

    # Duplicate a node: CSE merges it back; an unused node is then removed.
    node = next(n for n in model.graph if n.op_type == "Cos")
    dup = ir.node("Cos", list(node.inputs))
    model.graph.insert_after(node, dup)
    extra = ir.node("Sin", [dup.outputs[0]])
    model.graph.insert_after(dup, extra)
    n_cos = op_count(model, "Cos")
    report = run(model, ["cse", "remove-unused"])
    assert all(p.modified for p in report.passes)
    assert op_count(model, "Cos") == n_cos - 1


def test_upgrade_opset_only_where_the_target_takes_opset23(exported):
    from dsc.passes import PassContext

    model = load(exported["llama"])
    assert model.opset_imports[""] < 23
    assert not run(model, ["upgrade-opset"], PassContext()).passes[0].modified
    report = run(model, ["upgrade-opset"])  # rtx-4090
    assert report.passes[0].modified and model.opset_imports[""] == 23
    assert not run(model, ["upgrade-opset"]).passes[0].modified
