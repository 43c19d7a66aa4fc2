"""`half-fp32-gemm`: fp32 GEMMs with a constant weight as half GEMMs, for targets without FP32 GEMM.

DeepSeek-V2/V3 compute the MoE router in fp32 (`F.linear(h.float(), w.float())`). Since
transformers 5.24 the router weight itself stays fp32 in an fp16/bf16 export, so the exported
graph holds, after constant folding,

    logits = Gemm(Cast(h16, to=FLOAT), W32, transB=1)          W32: arbitrary float32 values

TensorRT-RTX refuses FP32 GEMMs on Turing (SM75: "FP32 GEMM is not supported"), so for a target
whose `TargetOps.fp32_gemm` is False (or with `PassOptions.half_fp32_gemm`) this pass rewrites
every MatMul/Gemm of a half graph whose output is fp32 and whose weight (input 1) is a 2-D fp32
constant into half GEMMs (fp32 accumulation, half output) summed in fp32. The weight is split
into W_hi = half(W32) and W_lo = half((W32 - W_hi) · 2^s), s = 11 for fp16 (8 for bf16), so
that W32 = W_hi + 2^-s · W_lo to about 2^-22 and the scaled residual stays a normal number.
`PassOptions.half_fp32_gemm_mode` picks how much of it is used:

    round        y = f(Gemm(h16, W_hi))                                   1 GEMM
    split        y = f(Gemm(h16, W_hi)) + 2^-s · f(Gemm(h16, W_lo))       2 GEMMs
    compensated  split + f(Gemm(Concat(h16, y_hi), [W_hi; -I]))           3 GEMMs (default)

(f = Cast to FLOAT, y_hi = the first GEMM's half output). "split" removes the weight's rounding
but not the rounding of y_hi to the half type (2^-12 of |logit| on average), which flips as many
routing decisions as the weight's rounding did; the third GEMM of "compensated" computes
h16 @ W_hi - y_hi inside one fp32 accumulation (the -I rows subtract y_hi), i.e. exactly that
lost rounding, to half precision of itself. The result matches the fp32 router to fp32 rounding.
Measured on the trained tiny DeepSeek-V3 (`benchmarks/router_precision.py`, docs/PASSES.md):
over the 57,216 held-out tokens "round" changes the top-k expert set of 0.041% of (token,
layer) pairs, "split" 0.031%, "compensated" none (mean KL 5e-10, top-1 agreement 1.0). The
three GEMMs cost about 3× the router's FLOPs, under 2% of a DeepSeek-V2/V3 MoE layer's.

When the activation is an fp32 value rather than a cast of a half one, it is split the same
way (a16 = half(a), a_lo = half((a - a16) · 2^s)) and Gemm(a_lo, W_hi) joins the low-order sum
(not in "round"). A weight exact in the half type needs no W_lo GEMM ("round" and "split"
are then one GEMM, "compensated" two). Not rewritten (a note says why): a weight beyond the
half range, a Gemm with a bias; with alpha or transA set, "compensated" falls back to "split".
An fp32 activation beyond the half range (65504 for fp16) would round to infinity (router
inputs are RMS-normalised). An fp32 MatMul over an inner dimension of 1 (an outer product:
transformers 5.18–5.23 compute RoPE's `inv_freq @ position_ids` that way) becomes the Mul it
is, exactly.

This relies on what TensorRT does with a strongly typed half GEMM: fp32 accumulation and the
declared half output. ONNX Runtime's CPU provider computes half GEMMs in fp32 and drops the
output rounding before an fp32 Cast; `fp32_view_of_half_gemms` makes it compute what TensorRT
does, for measurements. On every other target the pass does nothing: the model's fp32 router is
kept (TensorRT then runs it in TF32 on SM80+, its default: 0.026% of the pairs change there).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from dsc.passes._framework import DscPass, register_pass

_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
# 2^SHIFT scales the residual W - W_hi (at most half an ulp of W_hi: 2^-11 relative for fp16,
# 2^-8 for bf16) back to the magnitude of W, so that its rounding is relative, not subnormal.
_SHIFT = {ir.DataType.FLOAT16: 11, ir.DataType.BFLOAT16: 8}
MODES = ("round", "split", "compensated")
# Metadata key on the half GEMMs this pass emits (value: their role), read by
# `fp32_view_of_half_gemms` and kept in the ONNX file as a record of the rewrite.
MARK = "dsc.half_fp32_gemm"


def _half_source(value: ir.Value) -> ir.Value | None:
    """x if `value` is Cast(x, to=FLOAT) with x fp16/bf16."""
    node = value.producer()
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    src = node.inputs[0]
    if src is None or src.dtype not in _NUMPY:
        return None
    return src


def split_weight(w: np.ndarray, half: ir.DataType) -> tuple[np.ndarray, np.ndarray | None]:
    """(W_hi, W_lo or None when W is exact in `half`) with W ≈ W_hi + 2^-s · W_lo.

    `w` is float32 of any shape; both parts have its shape and the numpy type of `half`
    (float16 or ml_dtypes.bfloat16). Raises ValueError when a value is beyond the half range.
    """
    np_half = _NUMPY[half]
    w = np.asarray(w, dtype=np.float32)
    with np.errstate(over="ignore"):
        hi = w.astype(np_half)
    if not np.isfinite(hi.astype(np.float32)).all():
        raise ValueError(
            f"values beyond the {half.name.lower()} range (max |w| = {float(np.abs(w).max()):.4g})"
        )
    resid = w - hi.astype(np.float32)  # exact in fp32 (|resid| <= ulp(hi) / 2)
    if not resid.any():
        return hi, None
    return hi, (resid * np.float32(2.0 ** _SHIFT[half])).astype(np_half)


class _Emitter:
    """Builds the replacement of one GEMM node: new nodes carry its metadata (module path)."""

    def __init__(self, graph: ir.Graph, node: ir.Node, half: ir.DataType):
        self.graph, self.node, self.half = graph, node, half
        self.out = node.outputs[0]
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs, dtype: ir.DataType, stem: str, **attrs) -> ir.Value:
        n = ir.node(
            op_type,
            inputs,
            attributes=attrs or None,
            name=f"{self.node.name}/{stem}",
            num_outputs=1,
        )
        n.outputs[0].dtype = dtype
        n.outputs[0].name = f"{self.out.name}/{stem}"
        for k, v in self.node.metadata_props.items():
            n.metadata_props[k] = v
        self.nodes.append(n)
        return n.outputs[0]

    def const(self, stem: str, arr: np.ndarray, dtype: ir.DataType) -> ir.Value:
        name = f"{self.node.inputs[1].name}_{stem}"
        v = ir.Value(
            name=name,
            shape=ir.Shape(arr.shape),
            type=ir.TensorType(dtype),
            const_value=ir.tensor(arr, dtype=dtype, name=name),
        )
        self.graph.register_initializer(v)
        return v

    def gemm(self, x: ir.Value, w: ir.Value, stem: str) -> ir.Value:
        """The node's GEMM (same op and attributes) on half operands, its output cast to fp32."""
        n = ir.node(
            self.node.op_type,
            [x, w],
            attributes=self.node.attributes,
            name=f"{self.node.name}/{stem}",
            num_outputs=1,
        )
        n.outputs[0].dtype = self.half
        n.outputs[0].shape = self.out.shape
        n.outputs[0].name = f"{self.out.name}/{stem}"
        for k, v in self.node.metadata_props.items():
            n.metadata_props[k] = v
        n.metadata_props[MARK] = stem
        self.nodes.append(n)
        return n.outputs[0]

    def to_float(self, x: ir.Value, stem: str) -> ir.Value:
        y = self.op("Cast", [x], ir.DataType.FLOAT, stem, to=ir.DataType.FLOAT)
        y.shape = self.out.shape
        return y


def _is_half_graph(graph: ir.Graph) -> bool:
    """Whether the graph's float inputs/outputs (logits, KV cache) are half precision."""
    dtypes = {
        v.dtype
        for v in (*graph.inputs, *graph.outputs)
        if v.dtype is not None and v.dtype.is_floating_point()
    }
    return bool(dtypes & set(_NUMPY))


def _outer_product(node: ir.Node) -> bool:
    """An fp32 MatMul of two rank >= 2 values over an inner dimension of 1 (static)."""
    if node.op_type != "MatMul" or len(node.inputs) != 2:
        return False
    a, b = node.inputs
    if (
        a is None
        or b is None
        or a.dtype != ir.DataType.FLOAT
        or b.dtype != ir.DataType.FLOAT
        or a.shape is None
        or b.shape is None
        or len(a.shape) < 2
        or len(b.shape) < 2
    ):
        return False
    return a.shape[-1] == 1 and b.shape[-2] == 1


def _to_mul(graph: ir.Graph, node: ir.Node) -> None:
    """MatMul([..., M, 1], [..., 1, N]) → Mul: the same products, broadcast the same way."""
    mul = ir.node("Mul", list(node.inputs), name=f"{node.name}/outer", num_outputs=1)
    for k, v in node.metadata_props.items():
        mul.metadata_props[k] = v
    y, out = mul.outputs[0], node.outputs[0]
    y.dtype = ir.DataType.FLOAT
    if out.shape is not None:
        y.shape = out.shape
    graph.insert_before(node, mul)
    if out.is_graph_output():
        name = out.name
        ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
        out.name, y.name = f"{name}/matmul", name
    else:
        y.name = f"{out.name}/outer"
        ir.convenience.replace_all_uses_with(out, y)
    graph.remove(node, safe=True)


def _compensable(node: ir.Node) -> bool:
    """Whether `[a | y1] @ [W; -I]` computes a @ W - y1 for this node (no alpha, no transA)."""
    if node.op_type == "MatMul":
        return True
    return (
        node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_int("transA", 0) == 0
    )


class HalfFp32GemmPass(DscPass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.ctx.target.fp32_gemm and not self.ctx.options.half_fp32_gemm:
            return ir.passes.PassResult(model, False)
        mode = self.ctx.options.half_fp32_gemm_mode
        graph = model.graph
        if not _is_half_graph(graph):
            # Lowering every GEMM of an fp32 graph would silently make it a half model; targets
            # without FP32 GEMM refuse fp32 builds before export instead (dsc.plan).
            self.notes.append("fp32 graph: fp32 GEMMs kept")
            return ir.passes.PassResult(model, False)
        done = outer = 0
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            if _outer_product(node):
                _to_mul(graph, node)
                outer += 1
                continue
            out, w = node.outputs[0], node.inputs[1]
            if (
                out.dtype != ir.DataType.FLOAT
                or w is None
                or w.const_value is None
                or w.dtype != ir.DataType.FLOAT
                or len(w.const_value.shape) != 2
            ):
                continue
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                self.notes.append(f"{node.name}: fp32 GEMM kept (Gemm with a bias input)")
                continue
            src = _half_source(node.inputs[0])
            half = src.dtype if src is not None else ir.DataType.FLOAT16
            try:
                w_hi, w_lo = split_weight(w.const_value.numpy(), half)
            except ValueError as e:
                self.notes.append(f"{node.name}: fp32 GEMM kept (weight {e})")
                continue
            if mode == "compensated" and not _compensable(node):
                self.notes.append(
                    f"{node.name}: alpha or transA set; split without the output compensation"
                )
            self._rewrite(graph, node, src, half, w_hi, w_lo, mode)
            done += 1
        self.counts = {k: v for k, v in (("half GEMM", done), ("outer product", outer)) if v}
        return ir.passes.PassResult(model, bool(done or outer))

    def _rewrite(
        self,
        graph: ir.Graph,
        node: ir.Node,
        src: ir.Value | None,
        half: ir.DataType,
        w_hi: np.ndarray,
        w_lo: np.ndarray | None,
        mode: str,
    ) -> None:
        """Insert the half GEMMs and their fp32 sum before `node`; remove `node`."""
        e = _Emitter(graph, node, half)
        out, w, a = node.outputs[0], node.inputs[1], node.inputs[0]
        tag, shift = half.name.lower(), _SHIFT[half]
        exact = w_lo is None and src is not None
        hi = e.const(tag if exact or mode == "round" else f"{tag}_hi", w_hi, half)
        low = []  # fp32 terms scaled by 2^-shift
        if src is not None:
            a16 = src
        else:
            a16 = e.op("Cast", [a], half, f"act_{tag}", to=half)
            a16.shape = a.shape
            if mode != "round":
                back = e.op("Cast", [a16], ir.DataType.FLOAT, "act_hi_float", to=ir.DataType.FLOAT)
                resid = e.op("Sub", [a, back], ir.DataType.FLOAT, "act_resid")
                up = e.const("act_up", np.array(2.0**shift, np.float32), ir.DataType.FLOAT)
                scaled = e.op("Mul", [resid, up], ir.DataType.FLOAT, "act_resid_scaled")
                a_lo = e.op("Cast", [scaled], half, f"act_lo_{tag}", to=half)
                low.append(e.to_float(e.gemm(a_lo, hi, "gemm_act_lo"), "gemm_act_lo_float"))
        y1 = e.gemm(a16, hi, "gemm" if exact or mode == "round" else "gemm_hi")
        y = e.to_float(y1, "gemm_float" if exact or mode == "round" else "gemm_hi_float")
        if mode == "compensated" and _compensable(node):
            # r = a @ W_hi - y1, accumulated in fp32 inside one GEMM: the rounding error of y1.
            eye = -np.eye(
                w_hi.shape[
                    0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
                ],
                dtype=np.float32,
            ).astype(w_hi.dtype)
            along = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
            aug = e.const(f"{tag}_hi_neg_eye", np.concatenate([w_hi, eye], axis=along), half)
            cat = e.op("Concat", [a16, y1], half, "act_and_hi", axis=-1)
            r = e.to_float(e.gemm(cat, aug, "gemm_hi_residual"), "gemm_hi_residual_float")
            y = e.op("Add", [y, r], ir.DataType.FLOAT, "hi_compensated")
        if w_lo is not None and mode != "round":
            low.insert(
                0,
                e.to_float(
                    e.gemm(a16, e.const(f"{tag}_lo", w_lo, half), "gemm_lo"), "gemm_lo_float"
                ),
            )
        if low:
            total = low[0] if len(low) == 1 else e.op("Add", low, ir.DataType.FLOAT, "lo_sum")
            down = e.const("lo_down", np.array(2.0**-shift, np.float32), ir.DataType.FLOAT)
            total = e.op("Mul", [total, down], ir.DataType.FLOAT, "lo_scaled")
            y = e.op("Add", [y, total], ir.DataType.FLOAT, "sum")
        y.shape = out.shape
        graph.insert_before(node, e.nodes)
        if out.is_graph_output():
            name = out.name
            ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
            out.name, y.name = f"{name}/fp32", name
        else:
            ir.convenience.replace_all_uses_with(out, y)
        graph.remove(node, safe=True)
        if not w.uses() and w.name in graph.initializers:
            graph.initializers.pop(w.name)


def fp32_view_of_half_gemms(model: ir.Model, *, round_outputs: bool = True) -> int:
    """Rewrite, in place, the half GEMMs `half-fp32-gemm` emitted so that ONNX Runtime's CPU
    provider computes what TensorRT does; returns how many were rewritten.

    For measurements and tests only, never for an engine. ORT's CPU provider has no fp16 GEMM
    kernel: it runs one in fp32 between inserted casts and then drops the cast pair fp32 → half
    → fp32 before the graph's own Cast (measured with onnxruntime 1.32 at every optimization
    level), so the half GEMM's output is never rounded. Here `Gemm(a16, W16)` becomes
    `Cast(Gemm(Cast(a16, FLOAT), float32(W16)), half)`: the same fp32-accumulated products, with
    the output rounded to the half type by an explicit Cast that ORT keeps. Without
    `round_outputs` the output stays fp32 (only for GEMMs read by Cast(to=FLOAT) alone): what
    TensorRT's TF32 mode computes when the weight is rounded to 10 mantissa bits.
    """
    graph = model.graph
    done = 0
    for node in list(graph):
        if MARK not in node.metadata_props or node.op_type not in ("MatMul", "Gemm"):
            continue
        out, a, w = node.outputs[0], node.inputs[0], node.inputs[1]
        if out.dtype not in _NUMPY or w is None or w.const_value is None:
            continue
        uses = list(out.uses())
        if not round_outputs and (
            out.is_graph_output()
            or any(u.node.op_type != "Cast" or u.node.attributes.get_int("to") != 1 for u in uses)
        ):
            continue
        name = f"{w.name}_as_float"
        if name in graph.initializers:
            w32 = graph.initializers[name]
        else:
            w32 = ir.Value(
                name=name,
                shape=w.shape,
                type=ir.TensorType(ir.DataType.FLOAT),
                const_value=ir.tensor(w.const_value.numpy().astype(np.float32), name=name),
            )
            graph.register_initializer(w32)
        up = ir.node("Cast", [a], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}/up")
        up.outputs[0].dtype = ir.DataType.FLOAT
        g32 = ir.node(
            node.op_type, [up.outputs[0], w32], attributes=node.attributes, name=f"{node.name}/fp32"
        )
        g32.outputs[0].dtype = ir.DataType.FLOAT
        new, y = [up, g32], g32.outputs[0]
        if round_outputs:
            down = ir.node("Cast", [y], attributes={"to": out.dtype}, name=f"{node.name}/round")
            down.outputs[0].dtype = out.dtype
            new.append(down)
            y = down.outputs[0]
        graph.insert_before(node, new)
        if round_outputs:
            ir.convenience.replace_all_uses_with(out, y, replace_graph_outputs=True)
        else:
            for u in uses:  # the Cast(to=FLOAT) after it is a no-op on fp32
                u.node.replace_input_with(u.idx, y)
        graph.remove(node, safe=True)
        done += 1
    return done


register_pass(
    "half-fp32-gemm",
    HalfFp32GemmPass,
    "fp32 GEMM over a constant fp32 weight (MoE router) → half GEMMs (hi + lo weight "
    "split) summed in fp32, where the target has no FP32 GEMM (TensorRT-RTX SM75)",
    "precision",
)
