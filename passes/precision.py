"""`half-fp32-gemm`: fp32 GEMMs over half-precision operands, for targets without FP32 GEMM.

DeepSeek-V2/V3 compute the MoE router in fp32 from the fp16/bf16 hidden state and gate weight
(`F.linear(h.float(), w.float())`). After constant folding the exported graph holds

    logits = Gemm(Cast(h16, to=FLOAT), W32, transB=1)          W32 = float32(W16), exact

TensorRT-RTX refuses FP32 GEMMs on Turing (SM75: "FP32 GEMM is not supported"), so for a target
whose `TargetOps.fp32_gemm` is False (or with `PassOptions.half_fp32_gemm`) this pass rewrites it
into

    logits = Cast(Gemm(h16, W16, transB=1), to=FLOAT)

The GEMM accumulates in fp32 in TensorRT; what changes is the rounding of the logits to the half
type before the cast (relative 2^-11 for fp16). It is applied only when the weight is exactly
representable in the half type (it came from a half checkpoint), so nothing else changes. The
routing (sigmoid/softmax, top-k, bias) stays in fp32. On every other target the pass does
nothing: the model's fp32 router is kept as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from dsc.passes._framework import DscPass, register_pass

_HALF = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: None}


def _half_source(value: ir.Value) -> ir.Value | None:
    """x if `value` is Cast(x, to=FLOAT) with x fp16/bf16."""
    node = value.producer()
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    src = node.inputs[0]
    if src is None or src.dtype not in _HALF:
        return None
    return src


def _half_weight(value: ir.Value, half: ir.DataType) -> np.ndarray | None:
    """The weight in the half type, if `value` is an fp32 constant exactly representable."""
    if value.const_value is None or value.dtype != ir.DataType.FLOAT:
        return None
    w = value.const_value.numpy()
    if half == ir.DataType.FLOAT16:
        h = w.astype(np.float16)
        return h if np.array_equal(h.astype(np.float32), w) else None
    import ml_dtypes

    h = w.astype(ml_dtypes.bfloat16)
    return h if np.array_equal(h.astype(np.float32), w) else None


class HalfFp32GemmPass(DscPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.ctx.target.fp32_gemm and not self.ctx.options.half_fp32_gemm:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        done = 0
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                continue
            out = node.outputs[0]
            if out.dtype != ir.DataType.FLOAT:
                continue
            a = _half_source(node.inputs[0])
            if a is None:
                continue
            w = _half_weight(node.inputs[1], a.dtype)
            if w is None:
                self.notes.append(f"{node.name}: fp32 GEMM kept (weight not exact in "
                                  f"{a.dtype.name.lower()})")
                continue
            name = f"{node.inputs[1].name}_{a.dtype.name.lower()}"
            wv = ir.Value(name=name, shape=ir.Shape(w.shape), type=ir.TensorType(a.dtype),
                          const_value=ir.tensor(w, dtype=a.dtype, name=name))
            graph.register_initializer(wv)
            half = ir.node(node.op_type, [a, wv], attributes=node.attributes, name=f"{node.name}_half",
                           num_outputs=1)
            half.outputs[0].dtype = a.dtype
            half.outputs[0].shape = out.shape
            half.outputs[0].name = f"{out.name}_half"
            cast = ir.node("Cast", [half.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                           name=f"{node.name}_to_float", num_outputs=1)
            cast.outputs[0].dtype = ir.DataType.FLOAT
            cast.outputs[0].shape = out.shape
            graph.insert_before(node, [half, cast])
            for k, v in node.metadata_props.items():
                half.metadata_props[k] = v
                cast.metadata_props[k] = v
            ir.convenience.replace_all_uses_with(out, cast.outputs[0])
            if out.is_graph_output():
                continue
            graph.remove(node, safe=True)
            done += 1
        if done:
            self.counts = {"half GEMM": done}
        return ir.passes.PassResult(model, bool(done))


register_pass("half-fp32-gemm", HalfFp32GemmPass,
              "fp32 GEMM over half operands (MoE router) → half GEMM + Cast, where the target "
              "has no FP32 GEMM (TensorRT-RTX SM75)", "precision")
