"""The TensorRT / TensorRT-RTX engine builder (dsc.backends.tensorrt).

The graph is built here with onnx.helper: a one-layer decoder with the exporter's interface
(input_ids, attention_mask, position_ids, past_key_values.0.key/value → logits, present.*), a
real attention over the concatenated cache and MatMuls, in fp16 or fp32. TensorRT-RTX compiles it
ahead of time without a GPU; the standard-TensorRT tests need the real package and a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from dsc.backends.tensorrt import (
    BuildOptions,
    Flavour,
    ShapeEnvelope,
    TrtFlavourApi,
    available_backends,
    build_engine,
    infer_io_roles,
    inspect_engine,
    io_roles_from_spec,
    load_trt,
    profile_shapes,
    trtexec_command,
)
from dsc.errors import BackendError, BadInput, Unsupported

HEADS, DIM, HIDDEN, VOCAB = 2, 16, 32, 64
ENVELOPE = ShapeEnvelope(max_batch=4, max_input_len=16, max_kv=64)


def tiny_decoder(
    path: Path,
    dtype: str = "float16",
    *,
    symbols=("batch", "seq", "past", "total_seq"),
    broken: bool = False,
    external_data: bool = False,
) -> Path:
    """A one-layer KV-cache decoder graph with the exporter's input/output names."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    batch, seq, past, total = symbols
    rng = np.random.default_rng(0)
    inits = []

    def weight(name, *shape):
        values = (rng.standard_normal(shape) * 0.1).astype(np_dtype)
        inits.append(numpy_helper.from_array(values, name))

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))

    weight("embed", VOCAB, HIDDEN)
    weight("pos_embed", 256, HIDDEN)
    weight("lm_head.weight", HIDDEN, VOCAB)
    for n in "qkv":
        weight(f"{n}_proj.weight", HIDDEN, HIDDEN)
    const("heads_shape", np.array([0, 0, HEADS, DIM], np.int64))
    const("hidden_shape", np.array([0, 0, HIDDEN], np.int64))
    const("one", np.array(1.0, np_dtype))
    const("neg", np.array(-1e4, np_dtype))
    const("axes12", np.array([1, 2], np.int64))
    node = oh.make_node
    nodes = [
        node("Gather", ["embed", "input_ids"], ["tok"], name="embed"),
        node("Gather", ["pos_embed", "position_ids"], ["pos"], name="pos_embed"),
        node("Add", ["tok", "pos"], ["x"], name="add_pos"),
        node("Cast", ["attention_mask"], ["mask_f"], to=elem, name="mask_cast"),
        node("Sub", ["one", "mask_f"], ["mask_inv"], name="mask_inv"),
        node("Mul", ["mask_inv", "neg"], ["mask_bias"], name="mask_bias"),
        node("Unsqueeze", ["mask_bias", "axes12"], ["mask"], name="mask_unsqueeze"),
    ]
    for n in "qkv":
        nodes += [
            node("MatMul", ["x", f"{n}_proj.weight"], [f"{n}_flat"], name=f"{n}_proj"),
            node("Reshape", [f"{n}_flat", "heads_shape"], [f"{n}_bshd"], name=f"{n}_split"),
            node("Transpose", [f"{n}_bshd"], [n], perm=[0, 2, 1, 3], name=f"{n}_heads"),
        ]
    nodes += [
        node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=2, name="k_cat"),
        node("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=2, name="v_cat"),
        node("Transpose", ["present.0.key"], ["k_t"], perm=[0, 1, 3, 2], name="k_t"),
        node("MatMul", ["q", "k_t"], ["scores"], name="qk"),
        node("Add", ["scores", "mask"], ["scores_masked"], name="mask_add"),
        node("Softmax", ["scores_masked"], ["probs"], axis=-1, name="softmax"),
        node("MatMul", ["probs", "present.0.value"], ["ctx"], name="pv"),
        node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_t"),
        node("Reshape", ["ctx_t", "hidden_shape"], ["attn"], name="merge_heads"),
        node("Add", ["x", "attn"], ["h"], name="residual"),
        node("MatMul", ["h", "lm_head.weight"], ["logits"], name="lm_head"),
    ]
    vi = oh.make_tensor_value_info
    inputs = [
        vi("input_ids", TensorProto.INT64, [batch, seq]),
        vi("attention_mask", TensorProto.INT64, [batch, total]),
        vi("position_ids", TensorProto.INT64, [batch, seq]),
        vi("past_key_values.0.key", elem, [batch, HEADS, past, DIM]),
        vi("past_key_values.0.value", elem, [batch, HEADS, past, DIM]),
    ]
    outputs = [
        vi("logits", elem, [batch, seq, VOCAB]),
        vi("present.0.key", elem, [batch, HEADS, total, DIM]),
        vi("present.0.value", elem, [batch, HEADS, total, DIM]),
    ]
    if broken:
        nodes.append(node("NoSuchOperator", ["h"], ["junk"], name="broken_node"))
        outputs.append(vi("junk", elem, None))
    model = oh.make_model(
        oh.make_graph(nodes, "tiny_decoder", inputs, outputs, inits),
        opset_imports=[oh.make_opsetid("", 17)],
    )
    model.ir_version = 8
    if not broken:
        onnx.checker.check_model(model)
    if external_data:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    return {
        dtype: tiny_decoder(d / f"tiny_{dtype}.onnx", dtype) for dtype in ("float16", "float32")
    }


def _has_module(name: str) -> bool:
    try:
        load_trt(name)
    except Unsupported:
        return False
    return True


requires_rtx = pytest.mark.skipif(
    not _has_module("tensorrt_rtx"), reason="tensorrt_rtx not installed (pip install 'dsc[rtx]')"
)
requires_tensorrt = pytest.mark.skipif(
    not _has_module("tensorrt"), reason="standard TensorRT not installed"
)


# -- no TensorRT needed -----------------------------------------------------------------------


def test_import_is_lazy():
    code = (
        "import sys, dsc.backends.tensorrt; "
        "bad = [m for m in ('tensorrt', 'tensorrt_rtx', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_envelope_profiles():
    prefill, decode = ENVELOPE.profiles()
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.batch == decode.batch == (1, 2, 4)
    assert prefill.seq == (1, 8, 16) and prefill.past == (0, 0, 48)
    assert decode.seq == (1, 1, 1) and decode.past == (1, 32, 63)
    # past + seq never exceeds the KV capacity
    assert prefill.of("total")[2] == decode.of("total")[2] == 64
    assert ShapeEnvelope(1, 8, 8).profiles()[0].past == (0, 0, 0)


def test_envelope_prefill_token_budget():
    """max_num_tokens bounds the prefill profile's batch x prompt; decode keeps max_batch."""
    # R1-Distill-Qwen-1.5B on jetson-orin: B 8, L 4096, K 16384, N 8192 -> prefill batch 2.
    env = ShapeEnvelope(8, 4096, 16384, max_num_tokens=8192)
    prefill, decode = env.profiles()
    assert env.max_prefill_batch == 2
    assert prefill.batch == (1, 1, 2) and decode.batch == (1, 4, 8)
    assert prefill.batch[2] * prefill.seq[2] <= 8192
    # A prompt longer than the budget still gets one sequence per pass.
    assert ShapeEnvelope(8, 4096, 16384, max_num_tokens=1000).profiles()[0].batch == (1, 1, 1)
    # The budget never raises the batch above max_batch; None keeps B x L.
    assert ShapeEnvelope(4, 16, 64, max_num_tokens=10**6).max_prefill_batch == 4
    assert ShapeEnvelope(4, 16, 64).profiles() == ENVELOPE.profiles()
    with pytest.raises(BadInput):
        ShapeEnvelope(4, 16, 64, max_num_tokens=0)


def test_out_of_memory_is_named():
    from dsc.backends.tensorrt.builder import LogRecord, _classify_build_failure

    rec = LogRecord(
        "ERROR",
        "[localCheckMacros.cpp::getErrorStr::132] Error Code 2: "
        "OutOfMemory (Requested size was 7849115392 bytes.)",
    )
    err = _classify_build_failure([rec], "TensorRT-RTX 1.7 build of model.onnx for SM80")
    assert "could not allocate 7.31 GiB" in str(err) and "--max-num-tokens" in str(err)


@pytest.mark.parametrize("args", [(0, 8, 8), (1, 16, 8), (1, 8, -1), (1.5, 8, 8)])
def test_envelope_rejects_nonsense(args):
    with pytest.raises(BadInput):
        ShapeEnvelope(*args)


def test_infer_io_roles_from_symbols(graphs):
    roles = infer_io_roles(graphs["float16"])
    assert roles == {
        "input_ids": ("batch", "seq"),
        "attention_mask": ("batch", "total"),
        "position_ids": ("batch", "seq"),
        "past_key_values.0.key": ("batch", HEADS, "past", DIM),
        "past_key_values.0.value": ("batch", HEADS, "past", DIM),
    }


def test_infer_io_roles_falls_back_on_names(tmp_path):
    # torch.onnx.export(dynamo=True) without named Dims writes symbols like s10, s43 + s70.
    path = tiny_decoder(tmp_path / "s.onnx", symbols=("s10", "s70", "s15", "s43 + s70"))
    roles = infer_io_roles(path)
    assert roles["attention_mask"] == ("batch", "total")
    assert roles["past_key_values.0.value"] == ("batch", HEADS, "past", DIM)


def test_infer_io_roles_unknown_axis(tmp_path):
    x = oh.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 3])
    y = oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    model = oh.make_model(
        oh.make_graph([oh.make_node("Identity", ["pixel_values"], ["y"])], "g", [x], [y])
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(BadInput, match="pixel_values"):
        infer_io_roles(tmp_path / "m.onnx")


def test_io_roles_from_exporter_spec():
    # The layout of model_io.json written by dsc.export.
    spec = {
        "schema_version": 1,
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_seq"]},
            {
                "name": "past_key_values.0.compressed_kv",
                "dtype": "float16",
                "shape": ["batch", 1, "past", 512],
            },
        ],
    }
    roles = io_roles_from_spec(spec)
    assert roles["attention_mask"] == ("batch", "total")
    assert roles["past_key_values.0.compressed_kv"] == ("batch", 1, "past", 512)
    assert io_roles_from_spec({"input_ids": ["batch", "seq"]}) == {"input_ids": ("batch", "seq")}


def test_profile_shapes_keep_static_graph_dims():
    roles = {"input_ids": ("batch", "seq"), "past_key_values.0.key": ("batch", 2, "past", 16)}
    # A graph whose batch was specialised to 2 by the exporter keeps batch 2 in every profile.
    network = {"input_ids": (2, -1), "past_key_values.0.key": (2, 2, -1, 16)}
    prefill, decode = profile_shapes(roles, ENVELOPE, network)
    assert prefill.shapes["input_ids"] == ((2, 1), (2, 8), (2, 16))
    assert decode.shapes["past_key_values.0.key"] == ((2, 2, 1, 16), (2, 2, 32, 16), (2, 2, 63, 16))


def test_trtexec_command(graphs):
    opts = BuildOptions(
        workspace_mib=2048,
        optimization_level=4,
        timing_cache=Path("tc.cache"),
        dla_core=0,
        hardware_compatibility="ampere+",
    )
    argv = trtexec_command(graphs["float16"], "model.engine", ENVELOPE, opts)
    assert argv[:4] == [
        "trtexec",
        f"--onnx={graphs['float16']}",
        "--saveEngine=model.engine",
        "--stronglyTyped",
    ]
    # trtexec reads a profile's shapes only from the three options right after --profile=N.
    for index in (0, 1):
        at = argv.index(f"--profile={index}")
        assert [a.split("=")[0] for a in argv[at + 1 : at + 4]] == [
            "--minShapes",
            "--optShapes",
            "--maxShapes",
        ]
    prefill_max = argv[argv.index("--profile=0") + 3]
    assert "input_ids:4x16" in prefill_max and "attention_mask:4x64" in prefill_max
    assert "past_key_values.0.key:4x2x48x16" in prefill_max
    decode_min = argv[argv.index("--profile=1") + 1]
    assert "past_key_values.0.key:1x2x1x16" in decode_min and "input_ids:1x1" in decode_min
    for flag in (
        "--memPoolSize=workspace:2048M",
        "--builderOptimizationLevel=4",
        "--timingCacheFile=tc.cache",
        "--useDLACore=0",
        "--allowGPUFallback",
        "--hardwareCompatibilityLevel=ampere+",
        "--skipInference",
    ):
        assert flag in argv


def test_build_options_validation():
    assert BuildOptions(hardware_compatibility="Ampere+").hardware_compatibility == "ampere_plus"
    with pytest.raises(BadInput):
        BuildOptions(hardware_compatibility="turing_plus")
    with pytest.raises(BadInput):
        BuildOptions(optimization_level=7)


def test_flavour_names():
    assert Flavour.parse("rtx") is Flavour.RTX and Flavour.parse("TensorRT") is Flavour.TENSORRT
    with pytest.raises(Unsupported):
        Flavour.parse("onnxruntime")
    assert set(available_backends()) <= {Flavour.TENSORRT, Flavour.RTX}


def test_missing_backend_is_one_clear_error():
    if _has_module("tensorrt"):
        pytest.skip("standard TensorRT is installed here")
    with pytest.raises(Unsupported, match="standard TensorRT is not installed"):
        load_trt("tensorrt")


def _fake_standard_trt(num_dla_cores: int = 2):
    """Just enough of the standard tensorrt module for the flavour-specific config calls."""
    enum = types.SimpleNamespace
    trt = types.SimpleNamespace(
        __version__="10.3.0",
        NetworkDefinitionCreationFlag=enum(STRONGLY_TYPED=0),
        HardwareCompatibilityLevel=enum(NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2),
        BuilderFlag=enum(GPU_FALLBACK="GPU_FALLBACK", VERSION_COMPATIBLE="VERSION_COMPATIBLE"),
        DeviceType=enum(GPU="GPU", DLA="DLA"),
    )

    class Config:
        def __init__(self):
            self.flags = set()

        def set_flag(self, flag):
            self.flags.add(flag)

    return trt, types.SimpleNamespace(num_DLA_cores=num_dla_cores), Config()


def test_standard_flavour_config_calls():
    trt, builder, config = _fake_standard_trt()
    api = TrtFlavourApi(trt, Flavour.TENSORRT)
    api.check_options(
        dla_core=1, hardware_compatibility="ampere_plus", version_compatible=True, target_sm=87
    )
    assert api.network_flags() == 1
    assert api.supports_timing_cache()
    api.set_dla(builder, config, 1, gpu_fallback=True)
    assert (config.default_device_type, config.DLA_core) == ("DLA", 1)
    api.set_hardware_compatibility(config, "ampere_plus")
    assert config.hardware_compatibility_level == 1
    api.set_version_compatible(config)
    assert config.flags == {"GPU_FALLBACK", "VERSION_COMPATIBLE"}
    assert "not enforced" in api.set_target(config, 87)[0]
    with pytest.raises(Unsupported, match="2 DLA cores"):
        api.set_dla(builder, config, 2, gpu_fallback=True)


def test_rtx_flavour_refuses_standard_only_options():
    api = TrtFlavourApi(types.SimpleNamespace(), Flavour.RTX)
    for kwargs, match in [
        ({"dla_core": 0}, "DLA"),
        ({"hardware_compatibility": "ampere_plus"}, "hardware compatibility"),
        ({"version_compatible": True}, "version-compatible"),
        ({"target_sm": 90}, "SM90"),
    ]:
        args = {
            "dla_core": None,
            "hardware_compatibility": None,
            "version_compatible": False,
            "target_sm": None,
            **kwargs,
        }
        with pytest.raises(Unsupported, match=match):
            api.check_options(**args)


# -- TensorRT-RTX: ahead-of-time builds without a GPU -----------------------------------------


@requires_rtx
@pytest.mark.rtx
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("sm", [80, 89])
def test_rtx_builds_both_profiles(graphs, dtype, sm):
    result = build_engine(graphs[dtype], ENVELOPE, BuildOptions(target_sm=sm), backend="rtx")
    assert result.flavour is Flavour.RTX and result.trt_version.startswith("1.")
    assert result.target_sm == sm and result.strongly_typed
    assert result.engine and len(result.engine) == result.size_bytes
    weights = (VOCAB + 256 + 3 * HIDDEN) * HIDDEN + HIDDEN * VOCAB
    assert weights < result.size_bytes < 64 * 2**20
    assert result.num_layers > 0 and result.build_seconds > 0
    prefill, decode = result.profiles
    assert prefill.name == "prefill" and decode.name == "decode"
    assert prefill.shapes["input_ids"] == ((1, 1), (2, 8), (4, 16))
    assert prefill.shapes["attention_mask"] == ((1, 1), (2, 8), (4, 64))
    assert prefill.shapes["past_key_values.0.key"] == ((1, 2, 0, 16), (2, 2, 0, 16), (4, 2, 48, 16))
    assert decode.shapes["input_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode.shapes["attention_mask"] == ((1, 2), (2, 33), (4, 64))
    assert decode.shapes["past_key_values.0.value"] == (
        (1, 2, 1, 16),
        (2, 2, 32, 16),
        (4, 2, 63, 16),
    )
    assert result.memory_bytes.get("weights", 0) > 0
    summary = json.loads(json.dumps(result.to_json()))
    assert summary["backend"] == "tensorrt_rtx" and len(summary["profiles"]) == 2


@requires_rtx
@pytest.mark.rtx
def test_rtx_refuses_fp32_gemm_on_turing(graphs):
    with pytest.raises(Unsupported, match=r"FP32 GEMM is not supported") as info:
        build_engine(graphs["float32"], ENVELOPE, BuildOptions(target_sm=75), backend="rtx")
    message = str(info.value)
    assert "\n" not in message and "SM75" in message and "_proj" in message
    # fp16 runs on Turing
    assert (
        build_engine(
            graphs["float16"], ENVELOPE, BuildOptions(target_sm=75), backend="rtx"
        ).size_bytes
        > 0
    )


@requires_rtx
@pytest.mark.rtx
def test_rtx_parse_error_names_the_node(tmp_path):
    path = tiny_decoder(tmp_path / "broken.onnx", broken=True)
    with pytest.raises(BackendError) as info:
        build_engine(path, ENVELOPE, BuildOptions(target_sm=80), backend="rtx")
    message = str(info.value)
    assert "'broken_node'" in message and "NoSuchOperator" in message and "\n" not in message


@requires_rtx
@pytest.mark.rtx
def test_rtx_corrupt_onnx_is_bad_input(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"definitely not protobuf")
    with pytest.raises(BadInput, match="corrupt.onnx"):
        build_engine(path, ENVELOPE, BuildOptions(target_sm=80), backend="rtx")


@requires_rtx
@pytest.mark.rtx
@pytest.mark.parametrize(
    "opts",
    [
        BuildOptions(target_sm=80, dla_core=0),
        BuildOptions(target_sm=80, hardware_compatibility="ampere_plus"),
        BuildOptions(target_sm=80, version_compatible=True),
        BuildOptions(target_sm=87),
    ],
)
def test_rtx_refuses_standard_only_builds(graphs, opts):
    with pytest.raises(Unsupported):
        build_engine(graphs["float16"], ENVELOPE, opts, backend="rtx")


@requires_rtx
@pytest.mark.rtx
def test_rtx_external_data_engine_file_and_timing_cache(tmp_path):
    path = tiny_decoder(tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    cache = tmp_path / "timing.cache"
    engine = tmp_path / "out" / "model.engine"
    opts = BuildOptions(target_sm=86, workspace_mib=256, optimization_level=2, timing_cache=cache)
    result = build_engine(path, ShapeEnvelope(2, 8, 32), opts, backend="rtx", engine_path=engine)
    assert result.engine is None and result.engine_path == engine
    assert engine.stat().st_size == result.size_bytes > 0
    assert [p.name for p in engine.parent.iterdir()] == ["model.engine"]  # no temp file left
    # TensorRT-RTX timing caches are no-ops: not written, and the log says so.
    assert not cache.exists() and result.timing_cache_path is None
    assert any("timing cache" in r.message for r in result.log)


@requires_rtx
@pytest.mark.rtx
def test_rtx_io_spec_drives_profiles(graphs):
    spec = {
        "inputs": [
            {"name": "input_ids", "shape": ["batch", "seq"]},
            {"name": "attention_mask", "shape": ["batch", "total_seq"]},
            {"name": "position_ids", "shape": ["batch", "seq"]},
            {"name": "past_key_values.0.key", "shape": ["batch", 2, "past", 16]},
            {"name": "past_key_values.0.value", "shape": ["batch", 2, "past", 16]},
        ]
    }
    result = build_engine(
        graphs["float16"],
        ShapeEnvelope(1, 4, 8),
        BuildOptions(target_sm=80),
        backend="rtx",
        io_spec=spec,
    )
    assert result.profiles[1].shapes["attention_mask"] == ((1, 2), (1, 5), (1, 8))


@requires_rtx
@pytest.mark.rtx
def test_rtx_inspect_engine(graphs):
    result = build_engine(
        graphs["float16"], ShapeEnvelope(1, 4, 8), BuildOptions(target_sm=80), backend="rtx"
    )
    info = inspect_engine(result.engine, flavour="rtx")
    assert info.size_bytes == result.size_bytes
    if info.deserialized:  # on a machine with a supported GPU
        assert len(info.profiles) == 2 and "input_ids" in info.io_tensors
    else:  # CPU-only: both the header check and deserialization need the CUDA driver
        assert info.reason and "\n" not in info.reason
        assert info.validity == "INVALID"


# -- standard TensorRT: on the target GPU or Jetson -------------------------------------------


@requires_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_build_with_compat_and_timing_cache(graphs, tmp_path):
    cache = tmp_path / "timing.cache"
    opts = BuildOptions(
        workspace_mib=512,
        optimization_level=1,
        timing_cache=cache,
        hardware_compatibility="ampere_plus",
    )
    result = build_engine(graphs["float16"], ENVELOPE, opts, backend="tensorrt")
    assert result.flavour is Flavour.TENSORRT and result.strongly_typed
    assert result.size_bytes > 0 and result.num_layers > 0 and len(result.profiles) == 2
    assert cache.stat().st_size > 0
    again = build_engine(graphs["float16"], ENVELOPE, opts, backend="tensorrt")
    assert again.timing_cache_path == cache
    info = inspect_engine(result.engine, flavour="tensorrt")
    assert info.deserialized and len(info.profiles) == 2


@requires_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_dla_with_gpu_fallback(graphs):
    trt, _ = load_trt("tensorrt")
    if trt.Builder(trt.Logger()).num_DLA_cores == 0:
        pytest.skip("no DLA on this device")
    result = build_engine(
        graphs["float16"],
        ShapeEnvelope(1, 8, 16),
        BuildOptions(dla_core=0, gpu_fallback=True),
        backend="tensorrt",
    )
    assert result.size_bytes > 0 and result.options.dla_core == 0


@requires_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_version_compatible(graphs):
    result = build_engine(
        graphs["float16"],
        ShapeEnvelope(1, 8, 16),
        BuildOptions(version_compatible=True),
        backend="tensorrt",
    )
    assert result.size_bytes > 0
