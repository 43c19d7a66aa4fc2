"""The smoke check on quantized graphs: the KV-cache comparison runs without activation Q/DQ
(`strip_activation_qdq`), still catches a broken cache, and records the exact graph's gap."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest


@pytest.fixture(scope="module")
def int8_artifact(exported, tmp_path_factory):
    """The tiny Llama (fp32) quantized to INT8 by `dsc quantize`."""
    from dsc.cli import main

    out = tmp_path_factory.mktemp("smoke-qdq") / "q"
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as exc:
        mp.setenv("DSC_CACHE_DIR", str(out.parent / "cache"))
        main(
            [
                "quantize",
                str(exported["llama"]),
                "-o",
                str(out),
                "--int8",
                "--samples",
                "4",
                "--seq-len",
                "16",
                "--profile",
                "t4",
            ]
        )
    assert exc.value.code in (0, None)
    return out


def _ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_strip_activation_qdq_keeps_weights_and_is_idempotent(int8_artifact):
    from dsc.passes.quant.qdq import strip_activation_qdq

    model = ir.load(str(int8_artifact / "model.onnx"))
    before = _ops(model)
    n = strip_activation_qdq(model)
    after = _ops(model)
    # Every QuantizeLinear of this graph is an activation's (weights are stored quantized).
    assert n == before["QuantizeLinear"] > 0 and "QuantizeLinear" not in after
    assert after["DequantizeLinear"] == before["DequantizeLinear"] - n
    assert after["MatMul"] == before["MatMul"]
    assert strip_activation_qdq(model) == 0


def test_stripped_graph_keeps_weight_rounding_only(int8_artifact, exported):
    """Numbers: against the float graph the INT8 graph came from, the stripped graph still
    differs (its weights are the dequantized INT8 ones) but by less than the exact graph, which
    also rounds its activations."""
    from dsc.artifacts import load_io_spec
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.passes.quant.qdq import strip_activation_qdq

    io = load_io_spec(int8_artifact)
    stripped = ir.load(str(int8_artifact / "model.onnx"))
    strip_activation_qdq(stripped)
    ids = np.array([[3, 5, 7, 11, 13, 17, 19, 23]], dtype=np.int64)

    def logits(model, spec=io):
        r = OrtCausalLM(model, spec, optimization="none")
        return r.step(
            ids, np.ones_like(ids), np.arange(ids.shape[1])[None], r.empty_past(1)
        ).logits.astype(np.float64)

    ref = logits(exported["llama"] / "model.onnx", load_io_spec(exported["llama"]))
    exact = logits(int8_artifact / "model.onnx")
    weights_only = logits(stripped)
    err_exact = np.abs(exact - ref).mean()
    err_weights = np.abs(weights_only - ref).mean()
    assert 0 < err_weights < err_exact, (err_weights, err_exact)


def _break_cache(art: Path, dest: Path) -> Path:
    """A copy of `art` whose layer-0 cached keys are halved before use: prefill (empty cache)
    is unchanged, every decode step is wrong."""
    shutil.copytree(art, dest)
    model = ir.load(str(dest / "model.onnx"))
    past = next(v for v in model.graph.inputs if v.name.endswith("0.key"))
    half = ir.Value(name="half", const_value=ir.Tensor(np.array(0.5, np.float32)))
    readers = list(past.uses())
    mul = ir.node("Mul", [past, half], name="break_cache")
    for use in readers:
        use.node.replace_input_with(use.idx, mul.outputs[0])
    model.graph.register_initializer(half)
    model.graph.insert_before(next(iter(model.graph)), mul)
    ir.save(model, dest / "model.onnx")
    return dest


def test_smoke_on_int8_passes_and_records_exact_gap(int8_artifact):
    from dsc.artifacts import load_io_spec
    from dsc.pipeline.smoke import TOLERANCE, smoke_validate

    rec = smoke_validate(int8_artifact, load_io_spec(int8_artifact))
    assert rec["passed"] is True and rec["finite"] is True, rec
    pairs = _ops(ir.load(str(int8_artifact / "model.onnx")))["QuantizeLinear"]
    assert rec["kv_checked_without_activation_qdq"] == pairs
    assert rec["kv_rel_diff"] <= TOLERANCE[rec["dtype"]]
    assert rec["kv_rel_diff_exact_graph"] >= 0 and len(rec["generated_tokens"]) == 8


def test_smoke_on_int8_catches_a_broken_cache(int8_artifact, tmp_path):
    from dsc.artifacts import load_io_spec
    from dsc.pipeline.smoke import TOLERANCE, smoke_validate

    broken = _break_cache(int8_artifact, tmp_path / "broken")
    rec = smoke_validate(broken, load_io_spec(broken))
    assert rec["passed"] is False and rec["kv_rel_diff"] > TOLERANCE[rec["dtype"]]
    assert "activation Q/DQ removed" in rec["failures"][0]


def test_quantized_build_with_smoke_validation_writes_its_report(
    checkpoints, tmp_path, capsys, monkeypatch
):
    """`dsc build --int8 --validate smoke` end to end: the smoke record of a Q/DQ graph (with
    the exact graph's gap) reaches the manifest, build output and both reports."""
    import json

    from tests.conftest import run_cli

    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "build",
            str(checkpoints["qwen2"]),
            "--profile",
            "rtx-4090",
            "--int8",
            "--samples",
            "4",
            "--validate",
            "smoke",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    v = json.loads((out / "manifest.json").read_text())["validation"]
    assert v["kind"] == "smoke" and v["passed"] is True
    assert v["kv_checked_without_activation_qdq"] > 0 and v["kv_rel_diff_exact_graph"] >= 0
    md = (out / "report.md").read_text()
    assert "KV cache vs prefill with activation Q/DQ (not checked)" in md
    assert "activation Q/DQ pairs removed" in (out / "report.html").read_text()
