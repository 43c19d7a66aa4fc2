"""`half-fp32-gemm`: the fp32 MoE router GEMM becomes an fp16 GEMM on targets without FP32 GEMM.

TensorRT-RTX refuses FP32 GEMMs on SM75 (T4). DeepSeek-V2/V3 compute the router in fp32 from
fp16 operands; on T4 the pass lowers it, elsewhere it does nothing. Checked: structure, ONNX
Runtime outputs before/after (the only change is the rounding of the router logits to fp16),
and a real TensorRT-RTX build for SM75 that fails without the pass.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dsc.errors import Unsupported
from dsc.passes import PassContext, PassOptions, run_pipeline
from tests.passes.conftest import compare_ort, io_spec, load, save

needs_rtx = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                               reason="tensorrt_rtx not installed")


def _ctx(profile: str | None, **options) -> PassContext:
    from dsc.hardware import load_profile

    return PassContext(load_profile(profile) if profile else None, PassOptions(**options))


@pytest.fixture(scope="module")
def v3_fp16(checkpoints, tmp_path_factory):
    from dsc import api

    out = tmp_path_factory.mktemp("v3fp16") / "v3"
    api.export(checkpoints["deepseek_v3"], out, dtype="fp16", progress=lambda m: None)
    return out


def _fp32_gemms(model) -> int:
    import onnx_ir as ir

    return sum(1 for n in model.graph if n.op_type in ("Gemm", "MatMul")
               and n.outputs[0].dtype == ir.DataType.FLOAT
               and all(i.dtype == ir.DataType.FLOAT for i in n.inputs[:2]))


def test_lowered_only_where_the_target_has_no_fp32_gemm(v3_fp16):
    cleanup = ["fold-constants", "simplify", "cse", "remove-unused"]
    routers = 2  # the fixture's MoE layers
    for profile, opts, expect in (("t4", {}, True), ("rtx-4090", {}, False), ("a100", {}, False),
                                  (None, {"half_fp32_gemm": True}, True), (None, {}, False)):
        model = load(v3_fp16)
        rep = run_pipeline(model, _ctx(profile, **opts), only=[*cleanup, "half-fp32-gemm"])
        rec = rep.passes[-1]
        assert rec.modified is expect, profile
        assert _fp32_gemms(model) == (0 if expect else routers), profile
        if expect:
            assert rec.counts == {"half GEMM": routers}
            # idempotent: a second run finds nothing left to lower
            again = run_pipeline(model, _ctx(profile, **opts), only=["half-fp32-gemm"])
            assert again.passes[0].modified is False


def test_outputs_match_up_to_fp16_router_rounding(v3_fp16, tmp_path):
    model = load(v3_fp16)
    run_pipeline(model, _ctx("t4"))
    assert _fp32_gemms(model) == 0
    path = save(model, tmp_path / "model.onnx")
    # The reference is the fp16 export itself (fp32 router); ONNX Runtime CPU fp16 kernels.
    worst = compare_ort(v3_fp16, path, atol=2e-2)
    assert np.isfinite(worst)


@needs_rtx
@pytest.mark.slow
def test_sm75_build_needs_the_pass(v3_fp16, tmp_path):
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine

    def build(path):
        return build_engine(path, ShapeEnvelope(max_batch=1, max_input_len=16, max_kv=32),
                            BuildOptions(target_sm=75), backend="rtx", io_spec=io_spec(v3_fp16))

    without = load(v3_fp16)
    run_pipeline(without, _ctx("t4"), disable=["half-fp32-gemm"])
    with pytest.raises(Unsupported, match="FP32 GEMM is not supported"):
        build(save(without, tmp_path / "without" / "model.onnx"))
    model = load(v3_fp16)
    run_pipeline(model, _ctx("t4"))
    assert build(save(model, tmp_path / "with" / "model.onnx")).size_bytes > 0
