"""SiLU-gated MLP fusion: one GEMM for the gate and up projections.

    g = MatMul(x, Wg);  u = MatMul(x, Wu);  a = g * Sigmoid(g) * u
      ⇒ h = MatMul(x, [Wg | Wu]);  g, u = Split(h, [I, I], axis=-1);  a = g * Sigmoid(g) * u

ONNX has no SwiGLU op, and TensorRT fuses the pointwise SiLU and product into the GEMM epilogue
on its own; what it does not do is merge two GEMMs that read the same activation. One
[D, 2I] GEMM instead of two [D, I] reads x once and fills the GPU better at decode (M = batch).
The down projection is untouched. Applies to dense MLPs and to MoE shared experts; the routed
experts of the exported MoE already use one gate_up weight (see dsc.passes.fusion.moe).
"""

from __future__ import annotations

import numpy as np
from onnxscript.rewriter import pattern

from dsc.passes._framework import register_pass
from dsc.passes._ir import const_info, read_consts
from dsc.passes.fusion._common import FusionPass, lazy_const, new_const, tag

FORM = "gate_up GEMM + SiLU"


class GateUpFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, w_gate, w_up):
        g = op.MatMul(x, w_gate)
        u = op.MatMul(x, w_up)
        return op.Mul(op.Mul(g, op.Sigmoid(g)), u)

    def check(self, context, x, w_gate, w_up, **_):
        result = pattern.MatchResult()
        wg, wu = const_info(w_gate), const_info(w_up)
        if wg is None or wu is None:
            return result.fail("gate/up weights are not constants", [w_gate, w_up])
        if wg.ndim != 2 or wg.shape != wu.shape or wg.dtype != wu.dtype:
            return result.fail(
                f"gate/up weights are not equal-shaped 2-D matrices ({wg.shape} vs {wu.shape})"
            )
        self._graph = context.graph_or_function
        return result

    def rewrite(self, op, x, w_gate, w_up, **_):
        wg, wu = const_info(w_gate), const_info(w_up)
        # [D, 2I], computed when the graph is written (one layer's weight at a time).
        fused = lazy_const(
            op,
            self._graph,
            f"{w_gate.name}_gate_up",
            lambda: np.concatenate(read_consts(w_gate, w_up), -1),
            (wg.shape[0], wg.shape[1] + wu.shape[1]),
            wg.dtype,
            (w_gate, w_up),
        )
        sizes = new_const(
            op,
            self._graph,
            f"{w_gate.name}_gate_up_split",
            np.asarray([wg.shape[1], wu.shape[1]], dtype=np.int64),
        )
        g, u = op.Split(op.MatMul(x, fused), sizes, axis=-1, _outputs=2)
        silu = op.Mul(g, op.Sigmoid(g))
        tag(silu, "mlp", FORM)
        return op.Mul(silu, u)


RULE = GateUpFusion.rule()


class MlpFusionPass(FusionPass):
    commute = True

    def rules(self):
        return (RULE,)


register_pass(
    "fuse-mlp",
    MlpFusionPass,
    "SiLU-gated MLP: gate and up projections merged into one GEMM",
    "fusion",
)
