"""DeepSeek MLA: a plain key Concat, and weight absorption of kv_b_proj for decode.

Per layer the exported MLA attention reads the latent cache c ([B, 1, T, r], r = kv_lora_rank)
and the rotary key k_pe ([B, 1, T, R]), and expands both on every step:

    kv          = MatMul(c, W_kvb)  → [B, H, T, N + V]       (N = qk_nope, V = v_head_dim)
    k_nope, v   = Split(kv)
    K           = [k_nope | Expand(k_pe, H)]                  (exported as zeros + 2 ScatterND
                                                               through 6 Transposes)
    out         = softmax(c1 q · c2 Kᵀ + bias) v,  q = [q_nope | q_pe]

Rule `MlaKeyConcat` turns the ScatterND construction into `Concat(k_nope, Expand(k_pe))`
(exact: the two scatters write disjoint index ranges that cover the last axis).

Rule `MlaAbsorb` (when `mla_absorb_max_seq` > 0) replaces the attention by

    If(S <= mla_absorb_max_seq)
      then  absorbed:  q_lat = q_nope · W_ukᵀ  ([B, H, S, r], W_uk = W_kvb[:, h, :N] per head)
                       o_lat = attention([q_lat | q_pe], [c | k_pe], c)   one kv head (MQA)
                       out   = o_lat · W_uv   (W_uv = W_kvb[:, h, N:] per head)
      else  expanded:  the exported computation (kv_b_proj over all T cached tokens)

Both branches compute the same function (q_nope·k_nope = (q_nope W_ukᵀ)·c per head, and
p·v = (p·c) W_uv); ONNX Runtime before/after is compared in the tests on both branches. The
branch is chosen at run time from the query length, so one engine serves prefill (expanded:
fewer FLOPs when S is large) and decode (absorbed: no kv_b_proj over the cache). FLOPs per token
at DeepSeek-V3 dimensions are worked out in docs/PASSES.md.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript._internal.tape_builder import TapeBuilder
from onnxscript.rewriter import pattern

from dsc.passes._framework import register_pass
from dsc.passes._ir import (
    attr,
    const_array,
    const_info,
    const_ints,
    const_scalar,
    dim,
    dtype_name,
    producer,
    rank,
    read_consts,
)
from dsc.passes._target import TargetOps
from dsc.passes.fusion._common import FusionPass, branch_graph, lazy_const, new_const, tag
from dsc.passes.fusion.attention import emit_attention, mask_of

_P = [3, 1, 2, 0]


def _indices(idx: ir.Value) -> np.ndarray | None:
    """Values of Unsqueeze(Slice(Range(0, n, 1), s, e), [1]) (n a static dim), else None."""
    arr = const_array(idx)
    if arr is not None:
        return arr.reshape(-1) if arr.ndim == 2 and arr.shape[1] == 1 else None
    unsq = producer(idx, "Unsqueeze")
    if unsq is None or const_ints(unsq.inputs[1]) not in ([1], [-1]):
        return None
    sl = producer(unsq.inputs[0], "Slice")
    rng = producer(sl.inputs[0], "Range") if sl is not None else None
    if rng is None:
        return None
    start, delta = const_scalar(rng.inputs[0]), const_scalar(rng.inputs[2])
    limit = const_scalar(rng.inputs[1])
    if limit is None:
        gather = producer(rng.inputs[1], "Gather")
        shape = producer(gather.inputs[0], "Shape") if gather is not None else None
        k = const_scalar(gather.inputs[1]) if gather is not None else None
        if (
            shape is None
            or k is None
            or attr(shape, "start", 0) != 0
            or attr(shape, "end") is not None
        ):
            return None
        limit = dim(shape.inputs[0], int(k))
    if not all(isinstance(x, int) for x in (start, delta, limit)):
        return None
    values = np.arange(start, limit, delta)
    st, en = const_ints(sl.inputs[1]), const_ints(sl.inputs[2])
    axes = const_ints(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3] is not None else [0]
    steps = const_ints(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4] is not None else [1]
    if not st or not en or axes != [0] or not steps:
        return None
    return values[slice(st[0], en[0], steps[0])]


class MlaKeyConcat(pattern.RewriteRuleClassBase):
    """zeros → ScatterND(k_nope at [0, N)) → ScatterND(k_pe at [N, N+R)) ⇒ Concat(k_nope, k_pe)."""

    def __init__(self):
        super().__init__("MlaKeyConcat", remove_nodes=False)

    def pattern(self, op, base_shape, idx1, idx2, a, b):
        base = op.ConstantOfShape(base_shape, _allow_other_attributes=True)
        s1 = op.ScatterND(
            op.Transpose(base, perm=_P),
            idx1,
            op.Transpose(a, perm=_P),
            _allow_other_attributes=True,
        )
        k1 = op.Transpose(s1, perm=_P)
        s2 = op.ScatterND(
            op.Transpose(k1, perm=_P), idx2, op.Transpose(b, perm=_P), _allow_other_attributes=True
        )
        return op.Transpose(s2, perm=_P)

    def check(self, context, base_shape, idx1, idx2, a, b, **_):
        result = pattern.MatchResult()
        if rank(a) != 4 or rank(b) != 4:
            return result.fail("scattered parts are not 4-D", [a, b])
        da, db = dim(a, 3), dim(b, 3)
        if not isinstance(da, int) or not isinstance(db, int):
            return result.fail("scattered parts have no static last dim", [a, b])
        i1, i2 = _indices(idx1), _indices(idx2)
        if i1 is None or i2 is None:
            return result.fail("scatter indices are not readable ranges", [idx1, idx2])
        if list(i1) != list(range(da)) or list(i2) != list(range(da, da + db)):
            return result.fail(f"scatters do not write [0, {da}) and [{da}, {da + db})")
        return result

    def rewrite(self, op, a, b, **_):
        return op.Concat(a, b, axis=-1)


class MlaAbsorb(pattern.RewriteRuleClassBase):
    def __init__(self, target: TargetOps, max_seq: int):
        super().__init__("MlaAbsorb")
        self.target = target
        self.max_seq = max_seq

    def pattern(self, op, ckv, w_kvb, shp, sizes, k_pe, shp_e, q_nope, q_pe, c1, c2, bias, zero):
        kv = op.MatMul(ckv, w_kvb)
        kv = op.Reshape(kv, shp, _allow_other_attributes=True, _outputs=["kv4"])
        k_nope, v = op.Split(op.Transpose(kv, perm=[0, 2, 1, 3]), sizes, axis=3, _outputs=2)
        k = op.Concat(k_nope, op.Expand(k_pe, shp_e), axis=-1)
        q = op.Concat(q_nope, q_pe, axis=-1)
        kt = op.Transpose(k, perm=[0, 1, 3, 2])
        scores = op.Add(op.MatMul(op.Mul(q, c1), op.Mul(kt, c2)), bias)
        probs = op.Softmax(scores, axis=-1)
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), zero, probs), probs])
        return op.MatMul(probs, v)

    def check(
        self,
        context,
        ckv,
        w_kvb,
        shp,
        sizes,
        k_pe,
        shp_e,
        q_nope,
        q_pe,
        c1,
        c2,
        bias,
        zero,
        kv4,
        **_,
    ):
        result = pattern.MatchResult()
        w = const_info(w_kvb)
        if w is None or w.ndim != 2:
            return result.fail("kv_b_proj weight is not a constant matrix", w_kvb)
        if rank(ckv) != 4 or dim(ckv, 1) != 1 or dim(ckv, 3) != w.shape[0]:
            return result.fail("latent is not [B, 1, T, kv_lora_rank]", ckv)
        split = const_ints(sizes)
        if split is None or len(split) != 2:
            return result.fail("K/V split sizes are not constant", sizes)
        nope, vdim = split
        heads = dim(q_nope, 1)
        if not isinstance(heads, int) or w.shape[1] != heads * (nope + vdim):
            return result.fail("kv_b_proj columns are not heads x (qk_nope + v)", w_kvb)
        want = [dim(ckv, 0), dim(ckv, 2), heads, nope + vdim]
        if rank(kv4) != 4 or [dim(kv4, i) for i in range(4)] != want or None in want:
            return result.fail(
                f"kv_b_proj output is not reshaped to [B, T, H, qk_nope + v] "
                f"(annotated shape {kv4.shape})",
                kv4,
            )
        if (
            rank(q_nope) != 4
            or dim(q_nope, 3) != nope
            or rank(q_pe) != 4
            or not isinstance(dim(q_pe, 3), int)
            or dim(q_pe, 1) != heads
        ):
            return result.fail("query parts are not [B, H, S, qk_nope] and [B, H, S, rope]")
        if rank(k_pe) != 4 or dim(k_pe, 1) != 1 or dim(k_pe, 3) != dim(q_pe, 3):
            return result.fail("rotary key is not [B, 1, T, rope]", k_pe)
        s1, s2 = const_scalar(c1), const_scalar(c2)
        if not isinstance(s1, float) or not isinstance(s2, float):
            return result.fail("q/k scales are not constant scalars", [c1, c2])
        if zero is not None and const_scalar(zero) != 0:
            return result.fail("NaN guard does not replace with 0", zero)
        self._graph = context.graph_or_function
        self._scale = s1 * s2
        self._dims = dict(heads=heads, nope=nope, v=vdim, rope=dim(q_pe, 3), rank=w.shape[0])
        return result

    def rewrite(self, op, ckv, w_kvb, shp, sizes, k_pe, shp_e, q_nope, q_pe, bias, **_):
        d, graph = self._dims, self._graph
        h, n, v, r, rope = d["heads"], d["nope"], d["v"], d["rank"], d["rope"]
        dt = const_info(w_kvb).dtype

        def kv_b():
            return read_consts(w_kvb)[0].reshape(r, h, n + v)

        mask = mask_of(bias)
        dtype = dtype_name(q_nope) or "float32"

        then = TapeBuilder()
        # Both computed from kv_b_proj's weight when the graph is written.
        w_uk_t = lazy_const(  # [H, N, r]
            then,
            graph,
            "mla_w_uk_t",
            lambda: kv_b()[:, :, :n].transpose(1, 2, 0),
            (h, n, r),
            dt,
            (w_kvb,),
        )
        w_uv = lazy_const(  # [H, r, V]
            then,
            graph,
            "mla_w_uv",
            lambda: kv_b()[:, :, n:].transpose(1, 0, 2),
            (h, r, v),
            dt,
            (w_kvb,),
        )
        q_lat = then.MatMul(q_nope, w_uk_t)
        q_abs = then.Concat(q_lat, q_pe, axis=-1)
        k_lat = then.Concat(ckv, k_pe, axis=-1)
        qk = r + rope
        if self.target.attention_for(dtype, qk) and self.target.attention_equal_head_dims:
            # TensorRT's IAttention needs one head size: attend over [c | k_pe] as values too
            # and keep the first r columns (the rotary part of p·V is discarded).
            o_lat = emit_attention(
                then,
                graph,
                self.target,
                q_abs,
                k_lat,
                k_lat,
                scale=self._scale,
                bias=bias,
                mask=mask,
                heads=h,
                kv_heads=1,
                qk_dim=qk,
                v_dim=qk,
                block="attention",
            )
            o_lat = then.Slice(
                o_lat,
                then.Constant(value_ints=[0]),
                then.Constant(value_ints=[r]),
                then.Constant(value_ints=[-1]),
            )
        else:
            o_lat = emit_attention(
                then,
                graph,
                self.target,
                q_abs,
                k_lat,
                ckv,
                scale=self._scale,
                bias=bias,
                mask=mask,
                heads=h,
                kv_heads=1,
                qk_dim=qk,
                v_dim=r,
                block="attention",
            )
        out_then = then.MatMul(o_lat, w_uv)

        other = TapeBuilder()
        kv = other.MatMul(ckv, w_kvb)
        kv = other.Transpose(other.Reshape(kv, shp), perm=[0, 2, 1, 3])
        k_nope, vv = other.Split(kv, sizes, axis=3, _outputs=2)
        k = other.Concat(k_nope, other.Expand(k_pe, shp_e), axis=-1)
        q = other.Concat(q_nope, q_pe, axis=-1)
        out_else = emit_attention(
            other,
            graph,
            self.target,
            q,
            k,
            vv,
            scale=self._scale,
            bias=bias,
            mask=mask,
            heads=h,
            kv_heads=h,
            qk_dim=n + rope,
            v_dim=v,
            block="attention",
        )

        branches = [
            branch_graph(then, out_then, q_nope, graph, "mla_absorbed"),
            branch_graph(other, out_else, q_nope, graph, "mla_expanded"),
        ]
        seq = op.Shape(q_nope, start=2, end=3)
        limit = new_const(op, graph, "mla_absorb_max_seq", np.asarray([self.max_seq], np.int64))
        cond = op.Squeeze(op.LessOrEqual(seq, limit), op.Constant(value_ints=[0]))
        out = op.If(
            cond,
            then_branch=ir.AttrGraph("then_branch", branches[0]),
            else_branch=ir.AttrGraph("else_branch", branches[1]),
        )
        tag(out, "attention", f"MLA: absorbed if S <= {self.max_seq}, else expanded")
        return out


class MlaFusionPass(FusionPass):
    def may_emit_opset23(self) -> bool:
        return bool(self.ctx.target.attention_dtypes)

    def rules(self):
        rules = [MlaKeyConcat.rule()]
        if self.ctx.options.mla_absorb_max_seq > 0:
            rules.append(MlaAbsorb.rule(self.ctx.target, self.ctx.options.mla_absorb_max_seq))
        return rules


register_pass(
    "fuse-mla",
    MlaFusionPass,
    "DeepSeek MLA: key built by Concat; kv_b_proj absorbed into q/out for decode "
    "(If on query length)",
    "fusion",
)
