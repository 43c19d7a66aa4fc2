"""The optimized graphs still build with TensorRT-RTX for SM80 and SM89 (no GPU needed).

fp32 exports of every family (fusions in their fp32 form: canonical attention, MLA and MoE
If branches, RMSNormalization, RotaryEmbedding), and an fp16 Llama where the attention is the
opset-23 Attention op (TensorRT's IAttention). Also: which opset-23 ops the parser takes,
re-measured on one-node graphs (docs/PASSES.md).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.passes.conftest import compare_ort, io_spec, load, rtx_ctx, save

pytestmark = [
    pytest.mark.rtx,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed"
    ),
]


def _build(onnx_path, io, sm):
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine

    return build_engine(
        onnx_path,
        ShapeEnvelope(max_batch=2, max_input_len=16, max_kv=32),
        BuildOptions(target_sm=sm),
        backend="rtx",
        io_spec=io,
    )


# MLA families build in ~10-20 s per target here; V2 and V3 share the MLA and MoE forms, so
# each builds for one of the two targets (every construct is built for both SM80 and SM89).
BUILDS = [
    ("llama", 80),
    ("llama", 89),
    ("qwen2", 80),
    ("qwen2", 89),
    ("deepseek_v2", 80),
    ("deepseek_v3", 89),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,sm", BUILDS)
def test_optimized_fp32_graph_builds(optimized, family, sm):
    artifact, path, _ = optimized[family]
    result = _build(path, io_spec(artifact), sm)
    assert result.size_bytes > 0 and result.target_sm == sm


@pytest.fixture(scope="module")
def llama_fp16(checkpoints, tmp_path_factory):
    from dsc import api

    out = tmp_path_factory.mktemp("fp16") / "llama"
    api.export(checkpoints["llama"], out, dtype="fp16", progress=lambda m: None)
    return out


@pytest.mark.slow
def test_fp16_attention_op_builds_and_matches(llama_fp16, tmp_path):
    from dsc.passes import run_pipeline

    model = load(llama_fp16)
    run_pipeline(model, rtx_ctx())
    assert sum(n.op_type == "Attention" for n in model.graph) == 2
    path = save(model, tmp_path / "model.onnx")
    compare_ort(llama_fp16, path, atol=2e-2)  # fp16 graph on ONNX Runtime's CPU kernels
    for sm in (80, 89):
        assert _build(path, io_spec(llama_fp16), sm).size_bytes > 0


def _one_node(op, inputs, outputs, inits=(), **attrs):
    graph = helper.make_graph(
        [helper.make_node(op, [i.name for i in inputs] + [t.name for t in inits], ["y"], **attrs)],
        "g",
        inputs,
        outputs,
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _parses_and_builds(model, sm=89):
    import tensorrt_rtx as trt

    log = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse(model.SerializeToString()):
        return "parse"
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{sm}"), 0)
    return "ok" if builder.build_serialized_network(network, config) is not None else "build"


def test_rtx_parser_support_for_opset23_ops():
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    vi = helper.make_tensor_value_info
    rms = _one_node(
        "RMSNormalization",
        [vi("x", f32, [2, 8, 64])],
        [vi("y", f32, [2, 8, 64])],
        [numpy_helper.from_array(np.ones(64, np.float32), "w")],
        epsilon=1e-6,
    )
    rope = _one_node(
        "RotaryEmbedding",
        [vi("x", f32, [2, 4, 8, 16]), vi("c", f32, [2, 8, 8]), vi("s", f32, [2, 8, 8])],
        [vi("y", f32, [2, 4, 8, 16])],
    )

    def attention(dtype, head, seq=8):
        return _one_node(
            "Attention",
            [
                vi("q", dtype, [2, 4, seq, head]),
                vi("k", dtype, [2, 1, 9, head]),
                vi("v", dtype, [2, 1, 9, head]),
            ],
            [vi("y", dtype, [2, 4, seq, head])],
        )

    assert _parses_and_builds(rms) == "ok"
    assert _parses_and_builds(rope) == "ok"
    assert _parses_and_builds(attention(f16, 128)) == "ok"
    assert _parses_and_builds(attention(f16, 256)) == "ok"
    assert _parses_and_builds(attention(f32, 64)) == "build"  # no fp32 IAttention kernel...
    assert _parses_and_builds(attention(f32, 64, seq=1)) == "ok"  # ...except one query row
    assert _parses_and_builds(attention(f16, 512)) == "build"  # head size > 256
