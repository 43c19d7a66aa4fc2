"""MoE lowering: the routed experts as GEMMs TensorRT compiles, correct for every routing.

The export (`batched_mm` experts) gathers each token-slot's expert weight matrices:

    xr = repeat(x, k)                              [N*k, D]   (N tokens, top-k slots each)
    h  = Squeeze(MatMul(GatherND(Wgu, idx), xr))   [N*k, 2I]  (Wgu [E, 2I, D] gathered per slot)
    a  = SiLU(h[:, :I]) * h[:, I:]
    y  = Squeeze(MatMul(GatherND(Wd, idx), a)) * w [N*k, D]   (Wd [E, D, I])
    out = ReduceSum(Reshape(y, [N, k, D]), 1)

which copies a [2I, D] and a [D, I] matrix per token-slot: N*k*3*I*D weights moved for a
prefill of N tokens. `lower-moe` rewrites it into

    If(N*k < E)                                    (fewer slots than experts: decode)
      then  gather:  the same per-slot computation, on the relaid weights below
      else  dense:   R   = ReduceSum(OneHot-by-Equal(idx, E) * w, over k)      [N, E]
                     h   = MatMul(x, Wgu')                   [E, N, 2I]  one batched GEMM
                     a   = SiLU(h[..., :I]) * h[..., I:] * Rᵀ
                     out = MatMul(Reshape(Transpose(a), [N, E*I]), Wd')   [N, D]  one GEMM

with Wgu' = [E, D, 2I] and Wd' = [E*I, D] shared by both branches (one copy of the experts).
The dense form is exact for any routing (R holds each chosen expert's weight, 0 elsewhere, and
the k-sum of a one-hot product adds zeros), has no data-dependent shapes or scatters, and reads
every expert once per step (E*3*I*D) instead of copying N*k expert matrices. It does E/k times
the useful FLOPs, which is what a TensorRT without a grouped-GEMM MoE layer (IMoELayer is
SM100+ only) pays for a prefill; decode keeps the gather form. `moe_gather_decode=False` drops
the If and always runs the dense form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript._internal.tape_builder import TapeBuilder
from onnxscript.rewriter import pattern

from dsc.passes._framework import register_pass
from dsc.passes._ir import const_info, const_ints, dim, rank, read_consts
from dsc.passes.fusion._common import FusionPass, branch_graph, lazy_const, new_const, tag


def expert_gathers(graph: ir.Graph, keep=lambda node: True) -> dict[ir.Value, list[ir.Node]]:
    """The routed experts of `graph` (its top level) in the export's gather form: every
    `GatherND(W[E, a, b], idx)` on a constant 3-D expert weight for which `keep(node)` holds,
    grouped by the routing index `idx` they gather with (one group per MoE layer: the gate/up
    and the down matrices), in graph order. Empty once `lower-moe` has run (its gathers live
    in an If branch). The weights are not read (`const_info`)."""
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in graph:
        if node.op_type != "GatherND" or node.domain not in ("", "ai.onnx") or not keep(node):
            continue
        w = const_info(node.inputs[0])
        if w is not None and w.ndim == 3:
            groups.setdefault(node.inputs[1], []).append(node)
    return groups


class MoeLowering(pattern.RewriteRuleClassBase):
    def __init__(self, gather_decode: bool):
        super().__init__("MoeDense")
        self.gather_decode = gather_decode

    def pattern(
        self,
        op,
        x,
        idx,
        wts,
        ax_rep,
        shp_rep,
        shp_xr,
        flat1,
        flat2,
        ax_i,
        w_gu,
        ax_x,
        ax_h,
        ax_a,
        w_d,
        ax_a2,
        ax_w,
        shp_out,
        ax_sum,
        sum_type,
    ):
        xr = op.Reshape(
            op.Expand(op.Unsqueeze(x, ax_rep), shp_rep),
            shp_xr,
            _allow_other_attributes=True,
            _outputs=["xr"],
        )
        w_flat = op.Reshape(wts, flat1, _allow_other_attributes=True)
        i_flat = op.Unsqueeze(op.Reshape(idx, flat2, _allow_other_attributes=True), ax_i)
        h = op.Squeeze(
            op.MatMul(op.GatherND(w_gu, i_flat, batch_dims=0), op.Unsqueeze(xr, ax_x)), ax_h
        )
        g, u = op.Split(h, axis=1, num_outputs=2, _outputs=2)
        a = op.Mul(op.Mul(g, op.Sigmoid(g)), u)
        y = op.Squeeze(
            op.MatMul(op.GatherND(w_d, i_flat, batch_dims=0), op.Unsqueeze(a, ax_a)), ax_a2
        )
        # fp16/bf16 exports weight and sum the expert outputs in fp32 (routing weights' type)
        y = pattern.OrValue([op.Cast(y, to=sum_type), y])
        y = op.Mul(y, op.Unsqueeze(w_flat, ax_w))
        return op.ReduceSum(
            op.Reshape(y, shp_out, _allow_other_attributes=True),
            ax_sum,
            keepdims=0,
            _allow_other_attributes=True,
        )

    def check(
        self,
        context,
        x,
        idx,
        wts,
        ax_rep,
        shp_rep,
        shp_xr,
        flat1,
        flat2,
        ax_i,
        w_gu,
        ax_x,
        ax_h,
        ax_a,
        w_d,
        ax_a2,
        ax_w,
        shp_out,
        ax_sum,
        xr,
        sum_type,
        **_,
    ):
        result = pattern.MatchResult()
        gu, dn = const_info(w_gu), const_info(w_d)
        if gu is None or dn is None or gu.ndim != 3 or dn.ndim != 3:
            return result.fail("expert weights are not constant [E, ., .] tensors", [w_gu, w_d])
        e, two_i, d = gu.shape
        if two_i % 2 or dn.shape != (e, d, two_i // 2):
            return result.fail(
                f"expert weight shapes {gu.shape} and {dn.shape} do not fit "
                f"gate_up [E, 2I, D] and down [E, D, I]"
            )
        if rank(x) != 2 or dim(x, 1) != d or rank(idx) != 2 or rank(wts) != 2:
            return result.fail("tokens are not [N, D] with [N, k] routing", [x, idx, wts])
        k = dim(idx, 1)
        if not isinstance(k, int) or dim(wts, 1) != k:
            return result.fail("top-k is not static", idx)
        axes = {
            "repeat": (ax_rep, [1]),
            "flatten": (flat1, [-1]),
            "flatten idx": (flat2, [-1]),
            "index": (ax_i, [-1], [1]),
            "x": (ax_x, [-1], [2]),
            "h": (ax_h, [-1], [2]),
            "a": (ax_a, [-1], [2]),
            "y": (ax_a2, [-1], [2]),
            "w": (ax_w, [-1], [1]),
            "sum": (ax_sum, [1]),
        }
        for name, (value, *allowed) in axes.items():
            if const_ints(value) not in allowed:
                return result.fail(
                    f"{name} axes are {const_ints(value)}, expected {allowed[0]}", value
                )
        if rank(xr) != 2 or dim(xr, 1) != d:
            return result.fail("repeated tokens are not [N*k, D]", xr)
        out = const_ints(shp_out)
        if out is not None and (len(out) != 3 or out[1:] != [k, d]):
            return result.fail(f"per-slot outputs are not reshaped to [N, k, D]: {out}", shp_out)
        if sum_type is not None and ir.DataType(sum_type.as_int()) != wts.dtype:
            return result.fail("expert outputs are cast to a type other than the weights'")
        if sum_type is None and wts.dtype != x.dtype:
            return result.fail("routing weights and tokens differ in type", wts)
        self._graph = context.graph_or_function
        self._dims = dict(e=e, i=two_i // 2, d=d, k=k)
        self._cast = sum_type is not None
        return result

    def rewrite(self, op, x, idx, wts, w_gu, w_d, **_):
        graph, dims = self._graph, self._dims
        e, i, d, k = dims["e"], dims["i"], dims["d"], dims["k"]
        dtype = const_info(w_gu).dtype
        # Computed when the graph is written, one expert tensor at a time.
        w1 = lazy_const(  # [E, D, 2I]
            op,
            graph,
            f"{w_gu.name}_moe_gu",
            lambda: read_consts(w_gu)[0].transpose(0, 2, 1),
            (e, d, 2 * i),
            dtype,
            (w_gu,),
        )
        w2 = lazy_const(  # [E*I, D]
            op,
            graph,
            f"{w_d.name}_moe_down",
            lambda: read_consts(w_d)[0].transpose(0, 2, 1).reshape(e * i, d),
            (e * i, d),
            dtype,
            (w_d,),
        )

        def dense(t):
            experts = new_const(t, graph, "moe_expert_ids", np.arange(e, dtype=np.int64))
            onehot = t.Cast(
                t.Equal(t.Unsqueeze(idx, t.Constant(value_ints=[-1])), experts), to=wts.dtype
            )
            route = t.ReduceSum(
                t.Mul(onehot, t.Unsqueeze(wts, t.Constant(value_ints=[-1]))),
                t.Constant(value_ints=[1]),
                keepdims=0,
            )  # [N, E]
            if self._cast:
                route = t.Cast(route, to=x.dtype)
            h = t.MatMul(t.Unsqueeze(x, t.Constant(value_ints=[0])), w1)  # [E, N, 2I]
            g, u = t.Split(h, axis=-1, num_outputs=2, _outputs=2)
            a = t.Mul(t.Mul(g, t.Sigmoid(g)), u)
            a = t.Mul(a, t.Unsqueeze(t.Transpose(route, perm=[1, 0]), t.Constant(value_ints=[-1])))
            flat = t.Reshape(
                t.Transpose(a, perm=[1, 0, 2]),
                new_const(t, graph, "moe_flat", np.asarray([0, e * i], np.int64)),
            )
            out = t.MatMul(flat, w2)
            return t.Cast(out, to=wts.dtype) if self._cast else out

        def gather(t):
            ids = t.Reshape(idx, t.Constant(value_ints=[-1]))
            xr = t.Reshape(
                t.Expand(
                    t.Unsqueeze(x, t.Constant(value_ints=[1])),
                    t.Concat(t.Shape(x, start=0, end=1), t.Constant(value_ints=[k, d]), axis=0),
                ),
                t.Constant(value_ints=[-1, d]),
            )
            h = t.MatMul(
                t.Unsqueeze(xr, t.Constant(value_ints=[1])), t.Gather(w1, ids, axis=0)
            )  # [Nk, 1, 2I]
            g, u = t.Split(h, axis=-1, num_outputs=2, _outputs=2)
            a = t.Mul(t.Mul(g, t.Sigmoid(g)), u)
            wd = t.Gather(t.Reshape(w2, t.Constant(value_ints=[e, i, d])), ids, axis=0)
            y = t.Squeeze(t.MatMul(a, wd), t.Constant(value_ints=[1]))  # [Nk, D]
            if self._cast:
                y = t.Cast(y, to=wts.dtype)
            y = t.Mul(
                y,
                t.Unsqueeze(
                    t.Reshape(wts, t.Constant(value_ints=[-1])), t.Constant(value_ints=[-1])
                ),
            )
            y = t.Reshape(y, t.Constant(value_ints=[-1, k, d]))
            return t.ReduceSum(y, t.Constant(value_ints=[1]), keepdims=0)

        if not self.gather_decode:
            out = dense(op)
            tag(out, "moe", "dense two-GEMM")
            return out
        branches = []
        for name, build in (("moe_gather", gather), ("moe_dense", dense)):
            tape = TapeBuilder()
            branches.append(branch_graph(tape, build(tape), wts if self._cast else x, graph, name))
        slots = op.Mul(op.Shape(x, start=0, end=1), op.Constant(value_ints=[k]))
        cond = op.Squeeze(op.Less(slots, op.Constant(value_ints=[e])), op.Constant(value_ints=[0]))
        out = op.If(
            cond,
            then_branch=ir.AttrGraph("then_branch", branches[0]),
            else_branch=ir.AttrGraph("else_branch", branches[1]),
        )
        tag(out, "moe", "gather if N*k < E, else dense two-GEMM")
        return out


class MoeLoweringPass(FusionPass):
    def rules(self):
        return (MoeLowering.rule(self.ctx.options.moe_gather_decode),)


register_pass(
    "lower-moe",
    MoeLoweringPass,
    "MoE routed experts: per-slot weight gather → dense two-GEMM form (gather kept "
    "for decode, If on token count)",
    "lowering",
)
