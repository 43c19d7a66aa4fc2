"""bf16 graphs in ONNX Runtime on the CPU (as their float32 view) and bf16 quantized builds.

ONNX Runtime's CPU provider has no bf16 MatMul. `dsc.backends.onnxruntime.runner.inference_session`
runs a bf16 graph as its `float32_view`; calibration, `dsc run`, the smoke check, the gate (and
its layer locator) and `--verify-each` go through it. Checked here: the view computes what the
fp32 export computes up to the bf16 weights' rounding, leaves the bf16 model untouched, runs If
branches; `dsc build --dtype bf16 --int8` / `--int4-awq` on the trained tiny models complete,
keep the graph bf16 (bf16 Q/DQ scales, what TensorRT-RTX needs: a DequantizeLinear's output has
its scale's type), compile, and pass the accuracy gate against the bf16 reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsc.backends.tensorrt import Flavour, available_backends

from .conftest import REPO, run_cli

needs_rtx = pytest.mark.skipif(
    Flavour.RTX not in available_backends(),
    reason="tensorrt_rtx is not installed (pip install 'dsc[rtx]')",
)


@pytest.fixture(scope="module")
def qwen2_bf16(checkpoints, tmp_path_factory) -> Path:
    from dsc import api

    out = tmp_path_factory.mktemp("bf16") / "qwen2"
    api.export(checkpoints["qwen2"], out, dtype="bf16", progress=lambda m: None)
    return out


def test_float32_view_runs_the_bf16_graph_and_leaves_it_bf16(qwen2_bf16, exported):
    import onnx_ir as ir

    from dsc.backends.onnxruntime.runner import OrtCausalLM, float32_view, is_bf16
    from dsc.pipeline.smoke import smoke_validate

    model = ir.load(str(qwen2_bf16 / "model.onnx"))
    view = float32_view(model)
    assert is_bf16(model) and not is_bf16(view)
    # the view is a copy: the bf16 model keeps its types (a clone shares type objects)
    assert all(
        v.dtype == ir.DataType.BFLOAT16
        for v in model.graph.inputs
        if v.name.startswith("past_key_values.")
    )
    assert not any(
        o.dtype == ir.DataType.BFLOAT16 for n in view.graph.all_nodes() for o in n.outputs
    )

    io_bf16 = json.loads((qwen2_bf16 / "model_io.json").read_text())
    io_fp32 = json.loads((exported["qwen2"] / "model_io.json").read_text())
    bf16 = OrtCausalLM(qwen2_bf16 / "model.onnx", io_bf16)
    fp32 = OrtCausalLM(exported["qwen2"] / "model.onnx", io_fp32)
    ids = np.random.default_rng(0).integers(0, io_fp32["vocab_size"], (2, 12))
    mask, pos = np.ones_like(ids), np.broadcast_to(np.arange(12), (2, 12))
    a = bf16.step(ids, mask, pos, bf16.empty_past(2))
    b = fp32.step(ids, mask, pos, fp32.empty_past(2))
    assert a.logits.dtype == np.float32 and a.present[0].dtype == np.float32
    # the only difference: the weights rounded to bf16 (8 bits): a few per mille of the logits
    rel = np.abs(a.logits - b.logits).max() / np.abs(b.logits).max()
    assert 0 < rel < 3e-2, rel
    cos = (
        (a.logits * b.logits).sum(-1)
        / np.linalg.norm(a.logits, axis=-1)
        / np.linalg.norm(b.logits, axis=-1)
    )
    assert cos.min() > 0.999, cos.min()
    smoke = smoke_validate(qwen2_bf16, io_bf16, tokens=4)
    assert smoke["status"] == "ran" and smoke["passed"], smoke


def test_verify_each_runs_bf16_passes_and_their_if_branches(checkpoints, tmp_path):
    """The default passes on a bf16 MLA/MoE graph, ONNX Runtime after each (If branches)."""
    import onnx_ir as ir

    from dsc import api
    from dsc.hardware import load_profile
    from dsc.passes import PassContext, run_pipeline

    art = tmp_path / "v2"
    api.export(checkpoints["deepseek_v2"], art, dtype="bf16", progress=lambda m: None)
    model = ir.load(str(art / "model.onnx"))
    report = run_pipeline(
        model, PassContext(load_profile("a100")), verify_each=True, verify_atol=2e-2
    )
    assert sum(1 for n in model.graph if n.op_type == "If") >= 2  # MLA absorb + MoE lowering
    assert all(p.verify_max_abs is None or p.verify_max_abs <= 2e-2 for p in report.passes)
    assert any(p.verify_max_abs is not None for p in report.passes)


def _qdq_scale_types(path: Path) -> set[int]:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t.data_type for t in m.graph.initializer}
    types = set()

    def walk(g):
        for n in g.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                types.add(inits.get(n.input[1]))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return types


@needs_rtx
@pytest.mark.slow
@pytest.mark.parametrize(
    "model, flag", [("tiny-qwen2", "--int8"), ("tiny-deepseek-v3", "--int4-awq")]
)
def test_bf16_build_quantizes_compiles_and_passes_the_gate(model, flag, tmp_path, capsys):
    out = tmp_path / "art"
    code, _, err = run_cli(
        [
            "build",
            str(REPO / "examples" / "models" / model),
            "--profile",
            "a100",
            "--dtype",
            "bf16",
            flag,
            "--samples",
            "8",
            "--seq-len",
            "64",
            "-o",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    precision = flag.lstrip("-").split("-")[0]
    assert m["precision"] == precision and m["options"]["dtype"] == "bf16"
    assert m["stages"]["quantize"]["status"] == "ran"
    assert (out / "engines" / "a100-80gb" / "model.engine").stat().st_size > 0
    # the quantized graph stays bf16, Q/DQ scales included
    io = json.loads((out / "model_io.json").read_text())
    assert io["cache"]["dtype"] == "bfloat16" and io["quantization"] == precision
    assert _qdq_scale_types(out / "model.onnx") == {onnx.TensorProto.BFLOAT16}
    v = m["validation"]
    assert v["kind"] == "gate" and v["passed"] is True
    gate = json.loads((out / "validation.json").read_text())
    # measured: perplexity +0.63% (qwen2 int8), +0.32% (v3 int4); cosine p01 >= 0.99
    assert abs(gate["perplexity"]["delta"]) < 0.03, gate["perplexity"]
    assert gate["prefill"]["cosine_p01"] > 0.98 and gate["prefill"]["top1"] > 0.9
