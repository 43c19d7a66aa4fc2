"""Q/DQ scales are never zero, subnormal or non-finite after the cast to their storage type.

A dead output channel (all-zero weight column) and an all-zero calibrated activation range used
to give scales of 1e-8/qmax and 1e-6/qmax: zero once stored in fp16. `store_scale` floors them at
the storage type's smallest normal number, weights are quantized with the stored scale, and
`InsertQDQPass` refuses (InternalError) any scale that would still be bad. Checked on a one-GEMM
graph for INT8 W8A8, FP8 W8A8 and INT4 weight-only, in fp16 and bf16 (run as its float32 view),
against numpy.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from dsc.errors import InternalError
from dsc.passes.quant.qdq import (
    InsertQDQPass,
    QuantScheme,
    check_scales,
    dequantize_weight,
    quantize_weight,
    scale_floor,
    store_scale,
)

D, E, N = 256, 8, 6
DEAD, TINY = 3, 5  # output channels: all zero / range 2e-4 (below INT8 qmax * fp16 floor)
DTYPES = {
    "fp16": (ir.DataType.FLOAT16, np.float16),
    "bf16": (ir.DataType.BFLOAT16, ml_dtypes.bfloat16),
}
SCHEMES = {"int8": QuantScheme("int8"), "fp8": QuantScheme("fp8"), "int4": QuantScheme("int4")}


def _weight(np_dtype) -> np.ndarray:
    w = np.random.default_rng(0).standard_normal((D, E)).astype(np.float32) * 0.05
    w[:, DEAD] = 0.0
    w[:, TINY] *= 1e-3  # |w| ~ 5e-5 .. 2e-4
    return w.astype(np_dtype)


def _graph(w: np.ndarray, dtype: ir.DataType) -> ir.Model:
    """y = x @ W, fp16/bf16, one MatMul named like a linear layer."""
    x = ir.Value(name="x", shape=ir.Shape(["n", D]), type=ir.TensorType(dtype))
    wv = ir.Value(
        name="layers.0.mlp.down_proj.weight",
        shape=ir.Shape([D, E]),
        type=ir.TensorType(dtype),
        const_value=ir.tensor(w, dtype=dtype),
    )
    node = ir.node("MatMul", [x, wv], name="layers.0.mlp.down_proj/MatMul", num_outputs=1)
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", dtype, ir.Shape(["n", E])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[wv], opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10)


def _scales(model: ir.Model) -> dict[str, np.ndarray]:
    out = {}
    for n in model.graph:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            v = n.inputs[1]
            out[v.name] = v.const_value.numpy()
    return out


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    from dsc.backends.onnxruntime.runner import inference_session

    return inference_session(model).run(
        ["y"],
        {"x": x.astype(np.float32) if model.graph.inputs[0].dtype == ir.DataType.BFLOAT16 else x},
    )[0]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("precision", list(SCHEMES))
def test_dead_channel_and_zero_activation_give_positive_normal_scales(precision, dtype):
    ir_dtype, np_dtype = DTYPES[dtype]
    w = _weight(np_dtype)
    model = _graph(w, ir_dtype)
    scheme = SCHEMES[precision]
    # an all-zero activation range (calibration saw only zeros): amax 0
    qdq = InsertQDQPass({"x": 0.0}, scheme, defaults=False)
    assert qdq(model).modified
    scales = _scales(model)
    assert len(scales) == (1 if scheme.weight_only else 2)
    floor = scale_floor(np_dtype)
    for name, s in scales.items():
        assert s.dtype == np.dtype(np_dtype), name
        f = s.astype(np.float32)
        assert np.isfinite(f).all() and (f >= floor).all(), (name, f.min())
    ws = scales["layers.0.mlp.down_proj.weight_scale"].astype(np.float32)
    dead = ws[..., DEAD]
    if dtype == "fp16":  # the floor itself: 1e-8 / qmax would be 0 in fp16
        assert (dead == floor).all()
    # outputs: finite, the dead channel exactly 0, the rest = x @ DQ(W) (numpy, float64)
    rng = np.random.default_rng(1)
    x = np.zeros((N, D), np.float32)
    x[N // 2 :] = rng.standard_normal((N - N // 2, D)) * 2e-3  # rows calibration never saw
    y = _run(model, x.astype(np_dtype)).astype(np.float32)
    assert np.isfinite(y).all()
    assert (y[:, DEAD] == 0).all()
    assert (y[: N // 2] == 0).all()  # zero input: zero output through Q/DQ
    q, s, attrs = quantize_weight(w.astype(np.float32), scheme, scale_dtype=np_dtype)
    wdq = dequantize_weight(q, s, attrs).astype(np.float64)
    if scheme.weight_only:
        ref = x.astype(np_dtype).astype(np.float64) @ wdq
        np.testing.assert_allclose(y, ref, rtol=2e-2, atol=1e-5)
    else:  # the activation scale is the floor: inputs saturate at qmax * scale
        act = float(scales[next(k for k in scales if "act_scale" in k)].astype(np.float32))
        qmax = 448.0 if precision == "fp8" else 127.0
        xq = np.clip(x.astype(np_dtype).astype(np.float64), -qmax * act, qmax * act)
        ref = xq @ wdq
        assert np.abs(y - ref).max() <= 0.05 * np.abs(ref).max() + 1e-6


def test_weights_are_quantized_with_the_stored_scale():
    # a scale that rounds in fp16: q must be computed with the rounded value
    w = np.random.default_rng(2).standard_normal((64, 4)).astype(np.float32) * 0.3
    for precision in SCHEMES:
        q, s, attrs = quantize_weight(w, SCHEMES[precision], scale_dtype=np.float16)
        assert s.dtype == np.float16
        err = np.abs(dequantize_weight(q, s, attrs) - w).max(axis=0)
        step = s.astype(np.float32).max(axis=0) if s.ndim == 2 else s.astype(np.float32)
        bound = step * (0.5 if precision != "fp8" else 448 / 16)
        assert (err <= bound * 1.0001).all(), precision
        if precision == "fp8":
            assert np.isfinite(q.astype(np.float32)).all()  # no NaN from 448+ after rounding


def test_store_scale_floors_and_check_scales_refuses():
    s = store_scale(np.array([0.0, 1e-9, 3e-6, 1e-3]), np.float16)
    assert s.tolist() == [scale_floor(np.float16)] * 3 + [np.float16(1e-3)]
    check_scales("ok", s)
    for bad in (
        np.array([0.0], np.float16),
        np.array([1e-6], np.float16),
        np.array([np.inf], np.float32),
        np.array([np.nan], np.float32),
    ):
        with pytest.raises(InternalError, match="zero, subnormal or non-finite"):
            check_scales("bad", bad)
    with pytest.raises(InternalError, match="not finite"):
        store_scale(np.array([np.inf]), np.float16)


def test_insert_qdq_refuses_a_bad_scale(monkeypatch):
    import dsc.passes.quant.qdq as qdq

    monkeypatch.setattr(qdq, "store_scale", lambda s, dtype: np.asarray(s).astype(dtype))
    model = _graph(_weight(np.float16), ir.DataType.FLOAT16)
    with pytest.raises(InternalError, match="down_proj.weight_scale"):
        InsertQDQPass({"x": 1.0}, SCHEMES["int8"], defaults=False)(model)
