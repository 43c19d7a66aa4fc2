"""`half-fp32-gemm`: the fp32 MoE router GEMM becomes fp16 GEMMs on targets without FP32 GEMM.

TensorRT-RTX refuses FP32 GEMMs on SM75 (T4). DeepSeek-V2/V3 compute the router in fp32, and
transformers >= 5.24 keeps its weight in fp32 (values not representable in fp16); on T4 the pass
lowers it, elsewhere it does nothing. Checked: structure per mode, ONNX Runtime outputs against
float64 on a one-node router whose weight is not fp16-representable (fp16 and fp32 activation),
the whole V3 fixture before/after, and real TensorRT-RTX builds for SM75 (one fails without
the pass; `dsc build --profile t4` compiles).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dsc.errors import Unsupported
from dsc.passes import PassContext, PassOptions, run_pipeline
from tests.passes.conftest import compare_ort, io_spec, load, save

needs_rtx = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt_rtx not installed"
)


def _ctx(profile: str | None, **options) -> PassContext:
    from dsc.hardware import load_profile

    return PassContext(load_profile(profile) if profile else None, PassOptions(**options))


@pytest.fixture(scope="module")
def v3_fp16(checkpoints, tmp_path_factory):
    from dsc import api

    out = tmp_path_factory.mktemp("v3fp16") / "v3"
    api.export(checkpoints["deepseek_v3"], out, dtype="fp16", progress=lambda m: None)
    return out


def _fp32_gemms(model, *, const_weight: bool = False) -> int:
    """fp32 GEMMs (all of them: TensorRT-RTX refuses each on SM75), or those with a constant
    weight (the routers; transformers 5.18-5.23 also export RoPE's frequencies as one)."""
    import onnx_ir as ir

    return sum(
        1
        for n in model.graph
        if n.op_type in ("Gemm", "MatMul")
        and n.outputs[0].dtype == ir.DataType.FLOAT
        and all(i.dtype == ir.DataType.FLOAT for i in n.inputs[:2])
        and (not const_weight or n.inputs[1].const_value is not None)
    )


def test_lowered_only_where_the_target_has_no_fp32_gemm(v3_fp16):
    cleanup = ["fold-constants", "simplify", "cse", "remove-unused"]
    routers = 2  # the fixture's MoE layers
    for profile, opts, expect in (
        ("t4", {}, True),
        ("rtx-4090", {}, False),
        ("a100", {}, False),
        (None, {"half_fp32_gemm": True}, True),
        (None, {}, False),
    ):
        model = load(v3_fp16)
        rep = run_pipeline(model, _ctx(profile, **opts), only=[*cleanup, "half-fp32-gemm"])
        rec = rep.passes[-1]
        assert rec.modified is expect, profile
        assert _fp32_gemms(model, const_weight=True) == (0 if expect else routers), profile
        if expect:
            assert _fp32_gemms(model) == 0, profile
        if expect:
            assert rec.counts["half GEMM"] == routers
            # idempotent: a second run finds nothing left to lower
            again = run_pipeline(model, _ctx(profile, **opts), only=["half-fp32-gemm"])
            assert again.passes[0].modified is False


def test_outputs_match_the_fp32_router(v3_fp16, tmp_path):
    from dsc.passes.precision import fp32_view_of_half_gemms

    model = load(v3_fp16)
    run_pipeline(model, _ctx("t4"))
    assert _fp32_gemms(model) == 0
    # 3 GEMMs per router (2 where the weight is exact in fp16, as transformers < 5.24 stores
    # it), each output rounded as TensorRT does
    assert fp32_view_of_half_gemms(model) in (2 * 2, 2 * 3)
    path = save(model, tmp_path / "model.onnx")
    # The reference is the fp16 export itself (fp32 router); ONNX Runtime CPU fp16 kernels.
    worst = compare_ort(v3_fp16, path, atol=2e-2)
    assert np.isfinite(worst)


# -- one router GEMM, fp32 weight not representable in fp16 ----------------------------------

D, E, N = 256, 16, 200


def _router(weight: np.ndarray, *, fp32_act: bool = False, op: str = "Gemm"):
    """y[N, E] = x[N, D] @ W.T in fp32; x fp16 cast to fp32 (the export's form) or fp32."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    nodes = [] if fp32_act else [helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT)]
    x = "x" if fp32_act else "x32"
    if op == "Gemm":
        nodes.append(helper.make_node("Gemm", [x, "w"], ["y"], transB=1, name="router"))
        w = weight
    else:
        nodes.append(helper.make_node("MatMul", [x, "w"], ["y"], name="router"))
        w = weight.T.copy()
    g = helper.make_graph(
        nodes,
        "router",
        [
            helper.make_tensor_value_info(
                "x", TensorProto.FLOAT if fp32_act else TensorProto.FLOAT16, ["n", D]
            )
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", E]),
            # a half output, as a half graph has (logits): the pass leaves fp32 graphs alone
            helper.make_tensor_value_info("x16", TensorProto.FLOAT16, ["n", D]),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    g.node.append(helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return ir.from_proto(m)


def _ort(model, x: np.ndarray) -> np.ndarray:
    import onnx_ir as ir
    import onnxruntime as ort

    from dsc.backends.onnxruntime.runner import session_options

    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(),
        sess_options=session_options("basic"),
        providers=["CPUExecutionProvider"],
    )
    return sess.run(["y"], {"x": x})[0]


def _weight(seed: int = 0) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal((E, D)) * 0.05).astype(np.float32)
    assert not np.array_equal(w.astype(np.float16).astype(np.float32), w)
    return w


GEMMS = {"round": 1, "split": 2, "compensated": 3}


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("fp32_act", [False, True], ids=["fp16-act", "fp32-act"])
def test_non_fp16_router_weight_lowered_per_mode(op, fp32_act):
    from dsc.passes.precision import MARK, fp32_view_of_half_gemms

    w = _weight()
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((N, D)) * 2).astype(np.float32 if fp32_act else np.float16)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(exact).max()
    errors = {}
    for mode, n_gemms in GEMMS.items():
        model = _router(w, fp32_act=fp32_act, op=op)
        rep = run_pipeline(
            model,
            _ctx(None, half_fp32_gemm=True, half_fp32_gemm_mode=mode),
            only=["half-fp32-gemm"],
        )
        assert rep.passes[0].modified and rep.passes[0].counts == {"half GEMM": 1}
        gemms = [n for n in model.graph if n.op_type == op]
        # an fp32 activation adds the GEMM of its low part (not in "round")
        assert len(gemms) == n_gemms + (fp32_act and mode != "round"), mode
        assert all(n.outputs[0].dtype.name == "FLOAT16" and MARK in n.metadata_props for n in gemms)
        assert _fp32_gemms(model) == 0
        again = run_pipeline(
            model,
            _ctx(None, half_fp32_gemm=True, half_fp32_gemm_mode=mode),
            only=["half-fp32-gemm"],
        )
        assert again.passes[0].modified is False
        fp32_view_of_half_gemms(model)  # ORT then rounds each half GEMM's output as TensorRT does
        y = _ort(model, x)
        assert np.isfinite(y).all()
        errors[mode] = float(np.abs(y - exact).max() / scale)
    fp32 = float(np.abs(_ort(_router(w, fp32_act=fp32_act, op=op), x) - exact).max() / scale)
    # round: the weight's and the output's fp16 rounding; split: the output's (<= 2^-11 of the
    # largest logit); compensated: fp32 accuracy (measured: 4.5e-7 vs the fp32 graph's 4.2e-7)
    assert 1e-4 < errors["round"] < 2e-3, errors
    assert errors["split"] <= 2.0**-11 + 1e-6 and errors["split"] < errors["round"], errors
    assert errors["compensated"] < max(4 * fp32, 2e-6), (errors, fp32)


def test_fp16_exact_weight_needs_no_low_part():
    from dsc.passes.precision import fp32_view_of_half_gemms

    w = _weight().astype(np.float16).astype(np.float32)  # what transformers < 5.24 exported
    x = np.random.default_rng(2).standard_normal((N, D)).astype(np.float16)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    # no W_lo GEMM; "compensated" still recovers the rounding of the fp16 output
    for mode, gemms, tol in (
        ("round", 1, 2.0**-11),
        ("split", 1, 2.0**-11),
        ("compensated", 2, 2e-6),
    ):
        model = _router(w)
        run_pipeline(
            model,
            _ctx(None, half_fp32_gemm=True, half_fp32_gemm_mode=mode),
            only=["half-fp32-gemm"],
        )
        assert sum(n.op_type == "Gemm" for n in model.graph) == gemms, mode
        fp32_view_of_half_gemms(model)
        err = np.abs(_ort(model, x) - ref).max() / np.abs(ref).max()
        assert err <= tol, (mode, err)


def test_fp32_outer_product_becomes_mul():
    """transformers 5.18-5.23 export RoPE's frequencies as an fp32 [B, d, 1] @ [B, 1, S]."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["f", "p"], ["y"]),
            helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16),
        ],
        "rope",
        [
            helper.make_tensor_value_info("f", TensorProto.FLOAT, ["batch", 8, 1]),
            helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1, "seq"]),
        ],
        [helper.make_tensor_value_info("y16", TensorProto.FLOAT16, ["batch", 8, "seq"])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    model = ir.from_proto(m)
    rep = run_pipeline(model, _ctx("t4"), only=["half-fp32-gemm"])
    assert rep.passes[0].counts == {"outer product": 1}
    assert [n.op_type for n in model.graph] == ["Mul", "Cast"]
    rng = np.random.default_rng(3)
    f = rng.standard_normal((2, 8, 1)).astype(np.float32)
    p = rng.standard_normal((2, 1, 5)).astype(np.float32) * 100
    import onnxruntime as ort

    y = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    ).run(None, {"f": f, "p": p})[0]
    np.testing.assert_array_equal(y, (f @ p).astype(np.float16))  # exact


def test_fp32_graph_and_fp32_targets_are_left_alone():
    model = _router(_weight())
    rep = run_pipeline(model, _ctx("rtx-4090"), only=["half-fp32-gemm"])
    assert rep.passes[0].modified is False
    # a graph without half inputs or outputs is an fp32 model: not silently made half
    import onnx_ir as ir

    model = _router(_weight(), fp32_act=True)
    model.graph.outputs.pop()
    rep = run_pipeline(model, _ctx("t4"), only=["half-fp32-gemm"])
    assert rep.passes[0].modified is False and "fp32 graph" in rep.passes[0].notes[0]
    assert (
        sum(n.op_type == "Gemm" and n.outputs[0].dtype == ir.DataType.FLOAT for n in model.graph)
        == 1
    )


@needs_rtx
@pytest.mark.slow
def test_sm75_build_needs_the_pass(v3_fp16, tmp_path):
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine

    def build(path):
        return build_engine(
            path,
            ShapeEnvelope(max_batch=1, max_input_len=16, max_kv=32),
            BuildOptions(target_sm=75),
            backend="rtx",
            io_spec=io_spec(v3_fp16),
        )

    without = load(v3_fp16)
    run_pipeline(without, _ctx("t4"), disable=["half-fp32-gemm"])
    with pytest.raises(Unsupported, match="FP32 GEMM is not supported"):
        build(save(without, tmp_path / "without" / "model.onnx"))
    model = load(v3_fp16)
    run_pipeline(model, _ctx("t4"))
    assert build(save(model, tmp_path / "with" / "model.onnx")).size_bytes > 0


@needs_rtx
@pytest.mark.rtx
@pytest.mark.parametrize("mode", list(GEMMS))
def test_every_mode_builds_for_sm75(mode, tmp_path):
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine

    for fp32_act in (False, True):
        model = _router(_weight(), fp32_act=fp32_act)
        run_pipeline(model, _ctx("t4", half_fp32_gemm_mode=mode), only=["half-fp32-gemm"])
        path = save(model, tmp_path / f"{mode}-{fp32_act}" / "model.onnx")
        result = build_engine(
            path,
            ShapeEnvelope(max_batch=1, max_input_len=16, max_kv=16),
            BuildOptions(target_sm=75),
            backend="rtx",
            io_roles={"x": ("seq", D)},
        )
        assert result.size_bytes > 0


@needs_rtx
@pytest.mark.rtx
@pytest.mark.slow
def test_dsc_build_v3_for_t4(checkpoints, tmp_path, capsys):
    """`dsc build <V3 fixture> --profile t4`: fp32 router weight, TensorRT-RTX engine for SM75."""
    import json

    from tests.conftest import run_cli

    out = tmp_path / "art"
    code, stdout, err = run_cli(
        ["build", str(checkpoints["deepseek_v3"]), "-o", str(out), "--profile", "t4"], capsys
    )
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    eng = m["profiles"]["t4"]["engine"]
    assert eng["target_sm"] == 75 and (out / eng["path"]).stat().st_size > 0
    passes = json.loads((out / "passes_report.json").read_text())["report"]["passes"]
    half = next(p for p in passes if p["name"] == "half-fp32-gemm")
    assert half["counts"]["half GEMM"] == 2  # both MoE routers of the fixture
    assert m["validation"]["passed"] is True
