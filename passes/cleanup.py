"""Cleanup passes: constant folding, simplification, CSE, dead code, shape inference, sort.

Each wraps what onnx_ir or onnxscript already does, so the pipeline can name, time and count it:

    fold-constants    onnxscript's constant folder (shape arithmetic, casts of constants, ...)
    simplify          onnxscript's basic rewrite rules (Identity, no-op Cast/Reshape/Expand,
                      x*1, x+0, Cast∘Cast, Reshape∘Reshape, slice collapse, ...; not
                      Transpose∘Transpose or Slices→Split, which would hide fusion patterns), plus
                      dsc's `TransposeLastTwo`: the exporter's k.transpose(-2, -1) for
                      scaled_dot_product_attention, Reshape([-1,T,D]) → Transpose(0,2,1) →
                      Reshape([B,H,D,T]), becomes one Transpose(perm=[0,1,3,2])
    cse               onnx_ir's common-subexpression elimination
    remove-unused     onnx_ir's dead node / function / opset removal
    shape-inference   ONNX shape inference (keeps the exporter's symbolic dims)
    topo-sort         onnx_ir's topological sort
    upgrade-opset     onnxscript's version converter to opset 23, only where the target's
                      parser takes the opset-23 fused ops (see dsc.passes._target)
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from dsc.passes._framework import DscPass, register_pass
from dsc.passes._ir import Dim, entry_equals, rank, shape_expr


class FoldConstantsPass(DscPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        result = fold_constants(model)
        return ir.passes.PassResult(model, bool(result.modified))


class TransposeLastTwo(pattern.RewriteRuleClassBase):
    """Reshape(x,[-1,d2,d3]) → Transpose(0,2,1) → Reshape([d0,d1,d3,d2]) ⇒ Transpose(x,0,1,3,2)."""

    def pattern(self, op, x, s1, s2):
        t = op.Reshape(x, s1, _allow_other_attributes=True)
        t = op.Transpose(t, perm=[0, 2, 1])
        return op.Reshape(t, s2, _allow_other_attributes=True)

    def check(self, context, x, s1, s2, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if rank(x) != 4:
            return result.fail("input is not known to be 4-D", x)
        e1, e2 = shape_expr(s1), shape_expr(s2)
        if e1 is None or e2 is None:
            return result.fail("reshape shapes are not readable shape expressions")
        if not (
            len(e1) == 3
            and e1[0] == -1
            and entry_equals(e1[1], Dim(x, 2))
            and entry_equals(e1[2], Dim(x, 3))
        ):
            return result.fail(f"first reshape is not [-1, d2, d3] of the input: {e1}", s1)
        want = [Dim(x, 0), Dim(x, 1), Dim(x, 3), Dim(x, 2)]
        if len(e2) != 4 or not all(entry_equals(a, b) for a, b in zip(e2, want, strict=False)):
            return result.fail(f"second reshape is not [d0, d1, d3, d2]: {e2}", s2)
        return result

    def rewrite(self, op, x, **_):
        return op.Transpose(x, perm=[0, 1, 3, 2])


# onnxscript rules left out because they rewrite what the fusions match: TransposeTranspose
# merges MLA's key construction (… → Transpose(3,1,2,0)) with the attention's key transpose
# (0,1,3,2), and SlicesSplit turns rotate-half's two Slices into a Split.
_EXCLUDED = frozenset({"TransposeTranspose", "SlicesSplit"})


def simplify_rules() -> pattern.RewriteRuleSet:
    from onnxscript.rewriter import _DEFAULT_REWRITE_RULES

    rules = [r for r in _DEFAULT_REWRITE_RULES if r.name not in _EXCLUDED]
    return pattern.RewriteRuleSet([*rules, TransposeLastTwo.rule()])


class SimplifyPass(DscPass):
    max_sweeps = 4  # one rewrite can enable another (a removed Cast exposes a no-op Reshape)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules, count = simplify_rules(), 0
        for _ in range(self.max_sweeps):
            n = rules.apply_to_model(model)
            count += n
            if not n:
                break
        ident = common.IdentityEliminationPass()(model).modified
        self.counts = {"rewrites": count}
        return ir.passes.PassResult(model, bool(count) or ident)


class _Wrapped(DscPass):
    """A dsc-registered wrapper around one onnx_ir pass."""

    inner: type[ir.passes.PassBase]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = self.inner()(model)
        return ir.passes.PassResult(model, bool(result.modified))


class CsePass(_Wrapped):
    inner = common.CommonSubexpressionEliminationPass


class RemoveUnusedPass(DscPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified |= bool(p(model).modified)
        return ir.passes.PassResult(model, modified)


class ShapeInferencePass(DscPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            result = common.ShapeInferencePass()(model)
        except Exception as e:  # onnx raises InferenceError for graphs it cannot type
            self.notes.append(f"ONNX shape inference skipped: {str(e).splitlines()[0]}")
            return ir.passes.PassResult(model, False)
        return ir.passes.PassResult(model, bool(result.modified))


class TopoSortPass(_Wrapped):
    inner = common.TopologicalSortPass


class UpgradeOpsetPass(DscPass):
    """Opset 23, where the target takes opset-23 fused ops; a no-op otherwise."""

    target_opset = 23

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if not self.ctx.target.needs_opset23 or current is None or current >= self.target_opset:
            return ir.passes.PassResult(model, False)
        from onnxscript.version_converter import convert_version

        convert_version(model, self.target_opset, fallback=False)
        self.counts = {f"opset {current}->{self.target_opset}": 1}
        return ir.passes.PassResult(model, True)


register_pass("fold-constants", FoldConstantsPass, "constant folding (onnxscript optimizer)")
register_pass(
    "simplify",
    SimplifyPass,
    "no-op/identity/redundant-cast removal and small canonicalisations "
    "(onnxscript basic rules + transpose-last-two)",
)
register_pass("cse", CsePass, "common-subexpression elimination (onnx_ir)")
register_pass("remove-unused", RemoveUnusedPass, "dead node, function and opset removal (onnx_ir)")
register_pass("shape-inference", ShapeInferencePass, "ONNX shape inference (onnx_ir)")
register_pass("topo-sort", TopoSortPass, "topological sort (onnx_ir)")
register_pass(
    "upgrade-opset",
    UpgradeOpsetPass,
    "convert to opset 23 when the target parser takes opset-23 fused ops",
    "opset",
)
