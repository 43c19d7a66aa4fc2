"""Attention fusion (MHA/GQA with the KV cache): one Attention op, or the canonical form.

The exporter's scaled_dot_product_attention, after `simplify`, with K/V the concatenated cache
([B, Hkv, T, D]) repeated to H heads for GQA:

    Krep = Reshape(Expand(Unsqueeze(K, 2), [B, Hkv, G, T, D]), [B, H, T, D])      (also V)
    p    = Softmax(MatMul(q * c, Transpose(Krep, 0,1,3,2) * c) + Where(mask, 0, -inf))
    out  = MatMul(Where(IsNaN(p), 0, p), Vrep)

is rewritten, by target and dtype (see dsc.passes._target), into

    Attention   Attention(q, K, V, mask, scale=c²)      (opset 23; TensorRT's IAttention: one
                fused kernel; GQA without repeating K/V; fp16/bf16 only on TensorRT-RTX 1.7,
                so fp32 graphs get the canonical form; V zero-padded to q's head size where
                TensorRT needs equal head sizes, the result sliced back)
    canonical   q' = Reshape(q * c², [B, Hkv, G*S, D])                     (G query heads per
                out = MatMul(Softmax(MatMul(q', Transpose(K)) + Tile(bias, G)), V) kv head as rows)
                out = Reshape(out, [B, H, S, D])
                — the BMM → mask add → Softmax → BMM chain TensorRT's attention fusion looks
                for, with the scale folded into one operand (as TensorRT asks) and K/V never
                materialised H/Hkv times (the exported repeat copies the whole cache each step)

Fully masked rows (a left-padding query) keep the exported meaning: with the exporter's finite
bias Where(mask, 0, finfo.min) they attend uniformly (the bias goes in as an additive mask);
with a -inf bias they are 0, as the exported NaN guard made them: Where(any(mask), out, 0).
With MHA (G = 1) the canonical form only drops the repeat and the guard between Softmax and
the second BMM. DeepSeek MLA reaches this rule after `fuse-mla` has turned its key
construction into a plain Concat (see dsc.passes.fusion.mla).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from dsc.passes._framework import register_pass
from dsc.passes._ir import const_ints, const_scalar, dim, dtype_name, producer, rank
from dsc.passes._target import TargetOps
from dsc.passes.fusion._common import FusionPass, new_const, tag


def unrepeat(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(K, G) if `value` is K [B, Hkv, T, D] repeated G times per head, (value, 1) if plain."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsq = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsq is None:
        return (value, 1) if rank(value) == 4 else None
    k = unsq.inputs[0]
    if rank(k) != 4 or const_ints(unsq.inputs[1]) != [2]:
        return None
    ex, out = expand.outputs[0], reshape.outputs[0]
    if rank(ex) != 5 or rank(out) != 4:
        return None
    g = dim(ex, 2)
    hkv, d = dim(k, 1), dim(k, 3)
    if not all(isinstance(x, int) for x in (g, hkv, d)):
        return None
    same = [
        dim(ex, 0) == dim(k, 0),
        dim(ex, 1) == hkv,
        dim(ex, 3) == dim(k, 2),
        dim(ex, 4) == d,
        dim(out, 0) == dim(k, 0),
        dim(out, 1) == hkv * g,
        dim(out, 2) == dim(k, 2),
        dim(out, 3) == d,
    ]
    if not all(same) or dim(k, 0) is None or dim(k, 2) is None:
        return None
    return k, g


def mask_of(bias: ir.Value | None) -> ir.Value | None:
    """The boolean mask m of bias = Where(m, 0, -inf), else None.

    Only for -inf: the exporter's usual bias is Where(m, 0, finfo.min), finite, with which a
    fully masked row (a left-padding query) attends uniformly to every key instead of giving
    NaN; that bias is kept as an additive float mask so the rewrite stays exact.
    """
    where = producer(bias, "Where")
    if where is None:
        return None
    zero, neg = const_scalar(where.inputs[1]), const_scalar(where.inputs[2])
    if (
        where.inputs[0].dtype != ir.DataType.BOOL
        or zero != 0
        or neg is None
        or not np.isneginf(neg)
    ):
        return None
    return where.inputs[0]


def _guard(op, out, mask, *, on_nan: bool):
    """Rows with no unmasked key → 0 (what the exported NaN guard produced)."""
    if mask is not None:
        anyvalid = op.ReduceMax(
            op.Cast(mask, to=ir.DataType.FLOAT), op.Constant(value_ints=[-1]), keepdims=1
        )
        return op.Where(
            op.Cast(anyvalid, to=ir.DataType.BOOL),
            out,
            op.CastLike(op.Constant(value_float=0.0), out),
        )
    if on_nan:
        return op.Where(op.IsNaN(out), op.CastLike(op.Constant(value_float=0.0), out), out)
    return out


def emit_attention(
    op,
    graph,
    target: TargetOps,
    q,
    k,
    v,
    *,
    scale: float,
    bias,
    mask,
    heads: int,
    kv_heads: int,
    qk_dim: int,
    v_dim: int,
    block: str,
    form_note: str = "",
):
    """Attention of q [B, H, S, Dqk] over k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv], in the
    target's form; returns [B, H, S, Dv] with fully masked rows set to 0."""
    dtype = dtype_name(q) or "float32"
    if target.attention_for(dtype, qk_dim):
        pad = v_dim != qk_dim and target.attention_equal_head_dims
        vv = v
        if pad:
            pads = new_const(
                op, graph, "attn_vpad", np.asarray([0, 0, 0, 0, 0, 0, 0, qk_dim - v_dim], np.int64)
            )
            vv = op.Pad(v, pads)
        att_mask = mask if mask is not None else bias
        args = [q, k, vv] + ([att_mask] if att_mask is not None else [])
        out = op.Attention(*args, scale=float(scale))
        tag(out, block, "Attention" + form_note)
        if pad:
            out = op.Slice(
                out,
                op.Constant(value_ints=[0]),
                op.Constant(value_ints=[v_dim]),
                op.Constant(value_ints=[-1]),
            )
        # A finite float mask cannot make a row NaN in exact arithmetic; the NaN guard is for
        # kernels that overflow it (fp16 scores + finfo.min) - NaN would poison the cache.
        return _guard(op, out, mask, on_nan=mask is None and bias is not None)
    group = heads // kv_heads
    scaled = op.Mul(q, op.CastLike(op.Constant(value_float=float(scale)), q))
    kt = op.Transpose(k, perm=[0, 1, 3, 2])
    if group > 1:
        shape = new_const(op, graph, "attn_gqa_q", np.asarray([0, kv_heads, -1, qk_dim], np.int64))
        scaled = op.Reshape(scaled, shape)
    scores = op.MatMul(scaled, kt)
    if bias is not None:
        b = bias
        if group > 1:
            reps = new_const(op, graph, "attn_gqa_tile", np.asarray([1, 1, group, 1], np.int64))
            b = op.Tile(bias, reps)
        scores = op.Add(scores, b)
    probs = op.Softmax(scores, axis=-1)
    form = (
        f"canonical {'GQA' if group > 1 else 'MHA'}"
        + (f" ({group} q heads per kv head)" if group > 1 else "")
        + form_note
    )
    tag(probs, block, form)
    out = op.MatMul(probs, v)
    if group > 1:
        shape = new_const(op, graph, "attn_gqa_out", np.asarray([0, heads, -1, v_dim], np.int64))
        out = op.Reshape(out, shape)
    return _guard(op, out, mask, on_nan=False)


class AttentionFusion(pattern.RewriteRuleClassBase):
    def __init__(self, target: TargetOps):
        super().__init__("Attention")
        self.target = target

    def pattern(self, op, q, k_t, v_rep, c1, c2, bias, zero):
        scores = op.Add(op.MatMul(op.Mul(q, c1), op.Mul(k_t, c2)), bias)
        probs = op.Softmax(scores, axis=-1)
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), zero, probs), probs])
        return op.MatMul(probs, v_rep)

    def check(self, context, q, k_t, v_rep, c1, c2, bias, zero, **_):
        result = pattern.MatchResult()
        s1, s2 = const_scalar(c1), const_scalar(c2)
        if not isinstance(s1, float) or not isinstance(s2, float):
            return result.fail("q/k scales are not constant scalars", [c1, c2])
        if zero is not None and const_scalar(zero) != 0:
            return result.fail("NaN guard does not replace with 0", zero)
        tr = producer(k_t, "Transpose")
        if tr is None or list(tr.attributes["perm"].value) != [0, 1, 3, 2]:
            return result.fail("key is not Transpose(K, [0, 1, 3, 2]) (run simplify first?)", k_t)
        kr = unrepeat(tr.inputs[0])
        vr = unrepeat(v_rep)
        if kr is None or vr is None:
            return result.fail(
                "K/V are neither [B, Hkv, T, D] nor a GQA repeat of it", [tr.inputs[0], v_rep]
            )
        (k, gk), (v, gv) = kr, vr
        if gk != gv or dim(k, 1) != dim(v, 1):
            return result.fail("K and V are repeated differently")
        if rank(q) != 4 or not isinstance(dim(q, 1), int) or not isinstance(dim(q, 3), int):
            return result.fail("query is not [B, H, S, D] with static H and D", q)
        heads, kv_heads = dim(q, 1), dim(k, 1)
        if not isinstance(kv_heads, int) or kv_heads * gk != heads:
            return result.fail(f"{heads} query heads are not {gk} x {kv_heads} kv heads")
        if dim(k, 3) != dim(q, 3) or not isinstance(dim(v, 3), int):
            return result.fail("key head size differs from the query's", k)
        self._k, self._v, self._scale = k, v, s1 * s2
        self._graph = context.graph_or_function
        return result

    def rewrite(self, op, q, bias, **_):
        k, v = self._k, self._v
        return emit_attention(
            op,
            self._graph,
            self.target,
            q,
            k,
            v,
            scale=self._scale,
            bias=bias,
            mask=mask_of(bias),
            heads=dim(q, 1),
            kv_heads=dim(k, 1),
            qk_dim=dim(q, 3),
            v_dim=dim(v, 3),
            block="attention",
        )


class AttentionFusionPass(FusionPass):
    def may_emit_opset23(self) -> bool:
        return bool(self.ctx.target.attention_dtypes)

    def rules(self):
        return (AttentionFusion.rule(self.ctx.target),)


register_pass(
    "fuse-attention",
    AttentionFusionPass,
    "MHA/GQA attention over the KV cache → Attention (opset 23, fp16/bf16 on "
    "TensorRT-RTX) or the canonical BMM-Softmax-BMM without K/V repeat",
    "fusion",
)
