"""Rotary embedding fusion: three exported RoPE forms → one RotaryEmbedding (opset 23).

x is [B, H, S, D]; C, S are the cos/sin caches [B, S, D/2] (already position-gathered and
scaled by the exporter, e.g. YaRN's mscale); a = x[..., 0::2], b = x[..., 1::2].

    half      (Llama, Qwen2)  x*Unsqueeze(Concat(C,C)) + Concat(-x[D/2:], x[:D/2])*Unsqueeze(..S..)
                ⇒ RotaryEmbedding(x, C, S, interleaved=0)
    V3        (DeepSeek-V3: pairs moved to halves, then rotate-half)
              Concat(a*C - b*S, b*C + a*S)
                ⇒ RotaryEmbedding(Concat(a, b), C, S, interleaved=0)
    V2        (DeepSeek-V2: complex multiply on (real, imag) pairs, dsc's real-valued export)
              Reshape(Concat(Unsqueeze(a*C - b*S), Unsqueeze(a*S + b*C), -1), [B, H, S, D])
              with a, b = Gather(Reshape(x, [B, H, S, D/2, 2]), 0|1, axis=4)
                ⇒ RotaryEmbedding(x, C, S, interleaved=1), or, where the target's
                  interleaved RoPE is unreliable (TensorRT-RTX 1.7: an interleaved
                  RotaryEmbedding whose output feeds an If branch fails Myelin's SSA check),
                  pairs → halves (two strided Slices), interleaved=0, halves → pairs

TensorRT-RTX parses RotaryEmbedding into one IRotaryEmbeddingLayer (fp32 and fp16); standard
TensorRT from 10.15.1. Other targets keep the exported elementwise form, which TensorRT fuses
into a pointwise kernel. The rotated key is a graph output (the KV cache) in every form, so
the cache layout is unchanged.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from dsc.passes._framework import register_pass
from dsc.passes._ir import (
    Dim,
    attr,
    const_ints,
    const_scalar,
    dim,
    entry_equals,
    producer,
    rank,
    shape_expr,
)
from dsc.passes.fusion._common import FusionPass, tag

FORM = "RotaryEmbedding"


def _slice_is(
    starts, ends, axes, steps, start: int, end_min: int, end_max: int | None, step: int
) -> bool:
    s, e = const_ints(starts), const_ints(ends)
    a = const_ints(axes) if axes is not None else [0]
    st = const_ints(steps) if steps is not None else [1]
    if not (s and e and a and st) or len(s) != 1:
        return False
    if a[0] not in (3, -1) or st[0] != step or s[0] != start:
        return False
    return e[0] >= end_min and (end_max is None or e[0] <= end_max)


def _cache(op, value4d):
    """[B, S, D/2] from the [B, 1, S, D/2] multiplier the exporter made of it."""
    node = producer(value4d, "Unsqueeze")
    if node is not None and const_ints(node.inputs[1]) == [1]:
        return node.inputs[0]
    # V2: Gather(Unsqueeze(stack(cos, sin), 1), k, axis=-1) with stack = Concat(cos[...,None],
    # sin[..., None], axis=-1).
    gather = producer(value4d, "Gather")
    if gather is not None:
        k = const_scalar(gather.inputs[1])
        unsq = producer(gather.inputs[0], "Unsqueeze")
        stack = producer(unsq.inputs[0], "Concat") if unsq is not None else None
        if (
            stack is not None
            and k in (0, 1)
            and const_ints(unsq.inputs[1]) == [1]
            and len(stack.inputs) == 2
        ):
            part = producer(stack.inputs[k], "Unsqueeze")
            if part is not None and const_ints(part.inputs[1]) in (
                [-1],
                [rank(stack.inputs[k]) - 1],
            ):
                return part.inputs[0]
    return op.Squeeze(value4d, op.Constant(value_ints=[1]))


def _halves_equal(cos4) -> bool:
    """cos4 = Unsqueeze(f(Concat(g, g)), 1) with f elementwise: its two halves are equal."""
    node = producer(cos4, "Unsqueeze")
    v = node.inputs[0] if node is not None else None
    for _ in range(6):
        n = producer(v)
        if n is None:
            return False
        if n.op_type == "Concat":
            return (
                len(n.inputs) == 2
                and n.inputs[0] is n.inputs[1]
                and attr(n, "axis") in (-1, (rank(v) or 0) - 1)
            )
        if (
            n.op_type in ("Cos", "Sin", "Cast", "Identity")
            or n.op_type in ("Mul", "Div")
            and const_scalar(n.inputs[1]) is not None
        ):
            v = n.inputs[0]
        elif n.op_type == "Mul" and const_scalar(n.inputs[0]) is not None:
            v = n.inputs[1]
        else:
            return False
    return False


def _check_x(result, x):
    if rank(x) != 4 or not isinstance(dim(x, 3), int):
        return result.fail("input is not 4-D [B, H, S, D] with a static head size", x)
    if not isinstance(dim(x, 1), int):
        return result.fail("number of heads is not static", x)
    return None


class RopeHalfFusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, cos4, sin4, s1, e1, a1, t1, s2, e2, a2, t2):
        x1 = op.Slice(x, s1, e1, a1, t1)
        x2 = op.Slice(x, s2, e2, a2, t2)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos4), op.Mul(rotated, sin4))

    def check(self, context, x, cos4, sin4, s1, e1, a1, t1, s2, e2, a2, t2, **_):
        result = pattern.MatchResult()
        bad = _check_x(result, x)
        if bad is not None:
            return bad
        d = dim(x, 3)
        if not (
            _slice_is(s1, e1, a1, t1, 0, d // 2, d // 2, 1)
            and _slice_is(s2, e2, a2, t2, d // 2, d, None, 1)
        ):
            return result.fail("x is not split into two halves on the last axis")
        if not (_halves_equal(cos4) and _halves_equal(sin4)):
            return result.fail("cos/sin are not Concat(f, f) of one half (cannot take a half)")
        return result

    def rewrite(self, op, x, cos4, sin4, **_):
        d = dim(x, 3)
        half = op.Constant(value_ints=[d // 2])
        zero = op.Constant(value_ints=[0])
        last = op.Constant(value_ints=[-1])
        cos = op.Slice(_cache(op, cos4), zero, half, last)
        sin = op.Slice(_cache(op, sin4), zero, half, last)
        out = op.RotaryEmbedding(x, cos, sin, interleaved=0)
        tag(out, "rope", FORM)
        return out


class RopeV3Fusion(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, cos4, sin4, s1, e1, a1, t1, s2, e2, a2, t2):
        a = op.Slice(x, s1, e1, a1, t1)
        b = op.Slice(x, s2, e2, a2, t2)
        first = op.Sub(op.Mul(a, cos4), op.Mul(b, sin4))
        second = op.Add(op.Mul(b, cos4), op.Mul(a, sin4))
        return op.Concat(first, second, axis=-1)

    def check(self, context, x, cos4, sin4, s1, e1, a1, t1, s2, e2, a2, t2, **_):
        result = pattern.MatchResult()
        bad = _check_x(result, x)
        if bad is not None:
            return bad
        d = dim(x, 3)
        if not (
            _slice_is(s1, e1, a1, t1, 0, d - 1, None, 2)
            and _slice_is(s2, e2, a2, t2, 1, d, None, 2)
        ):
            return result.fail("x is not split into even/odd elements on the last axis")
        return result

    def rewrite(self, op, x, cos4, sin4, s1, e1, a1, t1, s2, e2, a2, t2, **_):
        deinterleaved = op.Concat(op.Slice(x, s1, e1, a1, t1), op.Slice(x, s2, e2, a2, t2), axis=-1)
        out = op.RotaryEmbedding(deinterleaved, _cache(op, cos4), _cache(op, sin4), interleaved=0)
        tag(out, "rope", FORM)
        return out


class RopeV2Fusion(pattern.RewriteRuleClassBase):
    def __init__(self, interleaved: bool = True):
        super().__init__("RopeV2Fusion")
        self.interleaved = interleaved

    def pattern(self, op, x, shape5, shape4, i0, i1, cos4, sin4, ax1, ax2):
        pairs = op.Reshape(x, shape5, _allow_other_attributes=True)
        a = op.Gather(pairs, i0, axis=4)
        b = op.Gather(pairs, i1, axis=4)
        real = op.Sub(op.Mul(a, cos4), op.Mul(b, sin4))
        imag = op.Add(op.Mul(a, sin4), op.Mul(b, cos4))
        stacked = op.Concat(op.Unsqueeze(real, ax1), op.Unsqueeze(imag, ax2), axis=-1)
        return op.Reshape(stacked, shape4, _allow_other_attributes=True)

    def check(self, context, x, shape5, shape4, i0, i1, cos4, sin4, ax1, ax2, **_):
        result = pattern.MatchResult()
        bad = _check_x(result, x)
        if bad is not None:
            return bad
        if const_scalar(i0) != 0 or const_scalar(i1) != 1:
            return result.fail("pairs are not (element 0, element 1)")
        if const_ints(ax1) not in ([-1], [4]) or const_ints(ax2) not in ([-1], [4]):
            return result.fail("real/imag are not stacked on a new last axis")
        d = dim(x, 3)
        e5, e4 = shape_expr(shape5), shape_expr(shape4)
        want = [Dim(x, 0), Dim(x, 1), Dim(x, 2)]
        if (
            e5 is None
            or len(e5) != 5
            or e5[3:] != [d // 2, 2]
            or not all(entry_equals(p, q) for p, q in zip(e5[:3], want, strict=False))
        ):
            return result.fail(f"x is not reshaped to [B, H, S, D/2, 2]: {e5}", shape5)
        if (
            e4 is None
            or len(e4) != 4
            or not entry_equals(e4[3], d)
            or not all(entry_equals(p, q) for p, q in zip(e4[:3], want, strict=False))
        ):
            return result.fail(f"result is not reshaped back to [B, H, S, D]: {e4}", shape4)
        return result

    def rewrite(self, op, x, cos4, sin4, **_):
        cos, sin = _cache(op, cos4), _cache(op, sin4)
        if self.interleaved:
            out = op.RotaryEmbedding(x, cos, sin, interleaved=1)
            tag(out, "rope", FORM)
            return out
        # Pairs to halves, rotate, halves back to pairs (see TargetOps.rotary_interleaved).
        d = dim(x, 3)
        zero, one = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
        end, last, two = (
            op.Constant(value_ints=[d]),
            op.Constant(value_ints=[-1]),
            op.Constant(value_ints=[2]),
        )
        halves = op.Concat(
            op.Slice(x, zero, end, last, two), op.Slice(x, one, end, last, two), axis=-1
        )
        rotated = op.RotaryEmbedding(halves, cos, sin, interleaved=0)
        tag(rotated, "rope", FORM + " (pairs as halves)")
        split = op.Reshape(rotated, op.Constant(value_ints=[0, 0, 0, 2, d // 2]))
        pairs = op.Transpose(split, perm=[0, 1, 2, 4, 3])
        return op.Reshape(pairs, op.Constant(value_ints=[0, 0, 0, d]))


def rules_for(target) -> tuple:
    return (
        RopeHalfFusion.rule(),
        RopeV3Fusion.rule(),
        RopeV2Fusion.rule(interleaved=target.rotary_interleaved),
    )


class RotaryFusionPass(FusionPass):
    def may_emit_opset23(self) -> bool:
        return True

    commute = True

    def rules(self):
        if not self.ctx.target.rotary_embedding:
            self.notes = [f"{self.ctx.target.name}: RoPE left as elementwise ops"]
            return ()
        return rules_for(self.ctx.target)


register_pass(
    "fuse-rotary",
    RotaryFusionPass,
    "rotary embedding (half, DeepSeek-V3 and -V2 forms) → RotaryEmbedding (opset 23)",
    "fusion",
)
