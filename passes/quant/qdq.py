"""InsertQDQPass: Q/DQ on the inputs of quantizable MatMuls, placed the way TensorRT fuses them.

Before → after, for a linear layer `MatMul(x, W)` with `W` an [in, out] initializer:

    x ─────────────────────────────▶ MatMul ◀── W (float)
    x ─▶ QuantizeLinear ─▶ DequantizeLinear ─▶ MatMul ◀── DequantizeLinear ◀── Wq (int8/fp8/int4)

Following TensorRT's Q/DQ placement guidance, Q/DQ goes only on the inputs of the GEMM (the
activation per tensor, the weight per output channel, or per block of 128 input rows for INT4),
never on residual adds, norms or softmax: TensorRT then fuses DQ→MatMul(→Q) into a quantized
kernel and keeps the rest in float. An activation read by several quantized MatMuls gets one
shared Q→DQ pair; its other readers (the residual) keep the float value.

Weight-only schemes (INT8 weight-only, INT4 AWQ) leave activations in float.

Scales are symmetric (zero point 0, as TensorRT requires) and stored in the graph's float dtype
(a DequantizeLinear producing fp16 needs an fp16 scale; a bf16 graph needs bf16 ones). A stored
scale is never zero, subnormal or non-finite (`store_scale`): a range is floored at 1e-8
(weights) or 1e-6 (activations) before dividing by qmax, and the scale, after its cast to the
storage type, at that type's smallest normal number (fp16 2^-14 ≈ 6.1e-5; bf16 and fp32 2^-126).
A zero scale makes QuantizeLinear divide by zero, and a subnormal one has fewer significant bits
and is flushed to zero where the GPU runs with flush-to-zero. The floor only matters for a dead
output channel or an all-zero activation (any positive scale represents zeros exactly) and, in
fp16, for channels whose range is below qmax · 2^-14 (INT8 7.8e-3, FP8 0.027, INT4 4.3e-4): their
steps are coarser than their range asks for, by at most 2^-14 absolute. Weights are quantized
with the stored scale, so DequantizeLinear reproduces what the scale was fitted for; a scale
that would still be bad is an internal error (`InsertQDQPass` checks every one). INT4 blocked
DequantizeLinear needs
opset 21; the pass raises the default-domain opset import to 21 when needed (opset 20 → 21
changes no operator this exporter emits except by widening type lists).

Routed MoE experts and MatMuls inside If branches (see `Target`): each expert weight is stored
quantized once, with one DequantizeLinear in the main graph read by every user (the export's
`GatherND(W[E, 2I, D])`; after `lower-moe` the dense branch's batched MatMul and the gather
branch's Gather on W'[E, D, 2I], the dense GEMM and the gather branch's Reshape+Gather on
Wd'[E*I, D]). Scales are per expert and per output channel: a blocked DequantizeLinear (opset
21, scale of the weight's rank) with `axis` = the input axis and `block_size` = the expert's
input size (INT8/FP8) or the INT4 block. Activation Q/DQ goes in the MatMul's own graph. A
MatMul in a branch calibration never runs (decode only) takes the range of the value its
activation copies (Unsqueeze/Reshape/Expand of a calibrated value: the gather branch's
gate_up input is the repeated MoE input); otherwise it is quantized weight-only and listed
under `weight_only` in the report.

Checked with TensorRT-RTX 1.7 (parse + build, fp32 and fp16 graphs, SM80 and SM89; FP8 builds
on SM89 only): blocked INT8, FP8 and INT4 DequantizeLinear on 3-D and 2-D constants (block =
whole input dim, or 128), per-axis DQ on 3-D constants, DQ → Gather(axis 0) → MatMul, DQ →
GatherND → MatMul (weight as MatMul input 0), a DQ in the main graph read by a MatMul or Gather
inside an If branch, and activation Q/DQ inside a branch all build. A DequantizeLinear inside
the branch reading the outer quantized initializer does not ("Quantized constant is only
allowed before DQ"), hence the main-graph DQ. ONNX Runtime 1.32 at its default optimization
level fails on an activation Q/DQ followed by Unsqueeze before the MatMul (its QDQ propagation
makes a uint8 zero point), so Q/DQ sits directly on the MatMul input.

Idempotent: a MatMul whose weight already comes from a DequantizeLinear is skipped, so a second
run returns `modified=False`.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_ir as ir

from dsc.errors import InternalError
from dsc.node_meta import module_path
from dsc.passes._ir import DerivedTensor, read_tensor

logger = logging.getLogger(__name__)

# Embeddings, the output head and MoE routers stay in float by default (`--exclude` adds more).
DEFAULT_EXCLUDE = ("*embed_tokens*", "*lm_head*", "*.mlp.gate")

INT8_MAX = 127.0
FP8_MAX = 448.0
INT4_MAX = 7.0


@dataclass(frozen=True)
class QuantScheme:
    precision: str  # int8 | fp8 | int4
    weight_only: bool = False
    block_size: int = 128  # INT4 block along the input dimension

    def __post_init__(self):
        if self.precision not in ("int8", "fp8", "int4"):
            raise ValueError(f"unknown quantized precision {self.precision!r}")
        if self.precision == "int4" and not self.weight_only:
            object.__setattr__(self, "weight_only", True)  # INT4 is weight-only (W4A16)

    @property
    def label(self) -> str:
        if self.precision == "int4":
            return f"int4-awq (W4A16, block {self.block_size:d})"
        return f"{self.precision} {'weight-only' if self.weight_only else 'W8A8'}"


@dataclass
class Target:
    """A quantizable MatMul: activation input, weight initializer, module path.

    `graph` is the graph holding the MatMul (None or the main graph, or an If branch:
    `in_subgraph`; smoothing passes only touch main-graph "linear" targets). `kind`:

    - "linear": `MatMul(x, W)`, W a 2-D [in, out] initializer;
    - "batched": `MatMul(x, W)`, W a 3-D [G, in, out] initializer (lowered MoE experts in the
      dense form, MLA's absorbed per-head weights);
    - "gathered": the weight reaches the MatMul through a gather along its expert axis:
      `Gather(W[E, in, out], ids)` or `Gather(Reshape(W[E*in, out], [E, in, out]), ids)` on
      input 1 (lowered MoE, decode branch), or `MatMul(GatherND(W[E, out, in], idx), x)` (the
      export's per-slot expert gather; the weight is input 0, `weight_input`).

    `in_axis` is the weight initializer's input (contracted) axis and `groups` the number of
    independent matrices stacked along it (experts or heads) that never share a scale; `path`
    holds the nodes between the initializer and the MatMul (MatMul side first).
    """

    node: ir.Node
    module: str
    activation: ir.Value
    weight: ir.Value
    excluded: bool = False
    reason: str = ""
    graph: ir.Graph | None = None
    kind: str = "linear"
    weight_input: int = 1
    in_axis: int = 0
    groups: int = 1
    path: tuple = ()
    in_subgraph: bool = False

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def activation_input(self) -> int:
        return 1 - self.weight_input


def matches(module: str, patterns) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, f"*{p}*") and "*" not in p:
            return p
    return None


def _static_shape(value: ir.Value) -> list[int] | None:
    dims = list(value.shape) if value.shape is not None else None
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return dims


def _reshape_target(node: ir.Node) -> list[int] | None:
    """The constant target shape of a Reshape (from its output shape, initializer or Constant)."""
    dims = _static_shape(node.outputs[0])
    if dims is not None:
        return dims
    shape = node.inputs[1]
    if shape is None:
        return None
    if shape.const_value is not None:
        return [int(x) for x in shape.const_value.numpy().reshape(-1)]
    p = shape.producer()
    if p is not None and p.op_type == "Constant":
        if "value_ints" in p.attributes:
            return list(p.attributes["value_ints"].as_ints())
        if "value" in p.attributes:
            return [int(x) for x in p.attributes["value"].as_tensor().numpy().reshape(-1)]
    return None


def _weight_form(node: ir.Node):
    """(weight input, initializer, path, kind, in_axis, groups) of a MatMul, or None."""
    for wi in (1, 0):
        v, path = node.inputs[wi], []
        while (
            v is not None and v.const_value is None and v.producer() is not None and len(path) < 2
        ):
            p = v.producer()
            if (
                p.op_type == "Gather"
                and p.attributes.get_int("axis", 0) == 0
                or p.op_type == "GatherND"
                and p.attributes.get_int("batch_dims", 0) == 0
                or p.op_type == "Reshape"
            ):
                path.append(p)
                v = p.inputs[0]
            else:
                break
        if v is None or v.const_value is None or v.dtype is None or not v.dtype.is_floating_point():
            continue
        rank = len(v.shape or ())
        ops = [p.op_type for p in path]
        if wi == 1 and not ops and rank == 2:
            return wi, v, (), "linear", 0, 1
        if wi == 1 and not ops and rank == 3:
            return wi, v, (), "batched", 1, int(v.shape[0])
        if wi == 1 and ops == ["Gather"] and rank == 3:
            return wi, v, tuple(path), "gathered", 1, int(v.shape[0])
        if wi == 1 and ops == ["Gather", "Reshape"] and rank == 2:
            dims = _reshape_target(path[1])
            if (
                dims is not None
                and len(dims) == 3
                and dims[0] > 0
                and dims[0] * dims[1] == v.shape[0]
                and dims[2] == v.shape[1]
            ):
                return wi, v, tuple(path), "gathered", 0, int(dims[0])
        if wi == 0 and ops == ["GatherND"] and rank == 3:
            return wi, v, tuple(path), "gathered", 2, int(v.shape[0])
    return None


# Role names of the targets of one module in one graph, in order, where the count matches.
_ROLES = {
    "mlp.experts": ("gate_up_proj", "down_proj"),
    "mla_absorbed": ("kv_b_proj.absorbed_uk", "kv_b_proj.absorbed_uv"),
    "mla_expanded": ("kv_b_proj",),
}


def _walk(graph: ir.Graph, owner: ir.Node | None = None):
    """(node, main-graph node that holds it, or None) for the graph and its If branches."""
    for node in graph:
        yield node, owner
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _walk(attr.value, owner or node)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from _walk(g, owner or node)


def find_targets(model: ir.Model, exclude=(), *, defaults: bool = True) -> list[Target]:
    """Every linear-layer MatMul (see `Target`), in the main graph and its If branches, in order.

    Targets in a branch are named after the module of the If that holds them, e.g.
    `model.layers.1.mlp.experts.down_proj@moe_dense`.
    """
    patterns = tuple(DEFAULT_EXCLUDE if defaults else ()) + tuple(exclude)
    found = []
    for node, owner in _walk(model.graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        form = _weight_form(node)
        if form is None:
            continue
        wi, w, path, kind, in_axis, groups = form
        base = module_path(owner if owner is not None else node) or (
            owner.name if owner is not None else node.name
        )
        found.append((node, owner, base, form))
    # role names: per (graph, base) in order
    by_key: dict = {}
    for node, _owner, base, _ in found:
        by_key.setdefault((id(node.graph), base), []).append(node)
    out = []
    for node, owner, base, (wi, w, path, kind, in_axis, groups) in found:
        g = node.graph
        sub = owner is not None
        peers = by_key[(id(g), base)]
        roles = _ROLES.get(g.name if sub else "") or next(
            (r for k, r in _ROLES.items() if base.endswith(k)), None
        )
        if kind == "linear" and not sub:
            mod = module_path(node) or node.name
        elif roles is not None and len(roles) == len(peers):
            mod = f"{base}.{roles[peers.index(node)]}"
        else:
            mod = f"{base}:{node.name}"
        if sub:
            mod += f"@{g.name}"
        hit = matches(mod, patterns)
        out.append(
            Target(
                node,
                mod,
                node.inputs[1 - wi],
                w,
                excluded=hit is not None,
                reason=f"excluded by {hit}" if hit else "",
                graph=g,
                kind=kind,
                weight_input=wi,
                in_axis=in_axis,
                groups=groups,
                path=path,
                in_subgraph=sub,
            )
        )
    return out


# Ops that move or repeat elements without changing any value: a range calibrated on the input
# is exactly the range of the output (used for activations in branches calibration never runs).
_SAME_VALUES = ("Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Transpose", "Flatten")


def range_sources(value: ir.Value) -> list[ir.Value]:
    """`value`, then the values it copies through `_SAME_VALUES` ops (same set of elements)."""
    chain = [value]
    while True:
        p = chain[-1].producer()
        if (
            p is None
            or p.op_type not in _SAME_VALUES
            or p.domain not in ("", "ai.onnx")
            or not p.inputs
            or p.inputs[0] is None
        ):
            return chain
        chain.append(p.inputs[0])


def find_routers(model: ir.Model) -> list[tuple[str, ir.Value]]:
    """(router module, top-k indices value) per MoE router: the TopK whose indices gather scores."""
    found: dict[str, ir.Value] = {}
    for node in model.graph:
        if node.op_type != "TopK":
            continue
        mod = module_path(node) or ""
        if not mod.endswith("mlp.gate"):
            continue
        idx = node.outputs[1]
        # The expert choice is the last TopK of the router (group selection TopKs come first).
        found[mod] = idx
    return list(found.items())


# ---- scales ----------------------------------------------------------------------------------

WEIGHT_AMAX_FLOOR = 1e-8
ACT_AMAX_FLOOR = 1e-6


def scale_floor(dtype) -> float:
    """The smallest normal number of a scale storage dtype (float16, bfloat16, float32)."""
    return float(ml_dtypes.finfo(np.dtype(dtype)).smallest_normal)


def store_scale(scale, dtype) -> np.ndarray:
    """`scale` (float32 values, any shape) cast to its storage `dtype`, then floored at the
    dtype's smallest normal number: positive, normal and finite, in `dtype`.

    Raises `InternalError` for a non-finite scale (an infinite or NaN range: nothing to floor).
    """
    scale = np.asarray(scale, dtype=np.float32)
    if not np.isfinite(scale).all():
        raise InternalError(
            f"a Q/DQ scale is not finite ({scale[~np.isfinite(scale)][:3]}): "
            f"the calibrated range or weight holds inf/NaN"
        )
    tiny = scale_floor(dtype)
    with np.errstate(over="ignore"):
        stored = scale.astype(dtype)
    stored = np.where(stored.astype(np.float32) < tiny, np.asarray(tiny).astype(dtype), stored)
    return stored.astype(dtype)


def weight_dq_inputs(
    graph: ir.Graph, name: str, q: np.ndarray, scale: np.ndarray, precision: str
) -> list[ir.Value]:
    """The inputs of a weight's DequantizeLinear, registered as initializers of `graph`:
    `<name>_quantized` (q: int8/fp8/int4 array, or a tensor such as a `DerivedTensor` that
    computes it when read), `<name>_scale` and, but for int4 (symmetric, no zero point
    input), a zero `<name>_zero_point` of q's dtype and the scale's shape."""
    qt = ir.Tensor(q) if isinstance(q, np.ndarray) else q
    qv = ir.Value(
        name=f"{name}_quantized",
        shape=ir.Shape(list(qt.shape)),
        type=ir.TensorType(qt.dtype),
        const_value=qt,
    )
    sv = _const(f"{name}_scale", scale)
    graph.register_initializer(qv)
    graph.register_initializer(sv)
    inputs = [qv, sv]
    if precision != "int4":
        zv = _const(f"{name}_zero_point", np.zeros(scale.shape, dtype=qt.dtype.numpy()))
        graph.register_initializer(zv)
        inputs.append(zv)
    return inputs


def check_scales(name: str, scale: np.ndarray) -> None:
    """Raise `InternalError` unless every value of a stored scale is positive, normal, finite."""
    s = np.asarray(scale)
    f = s.astype(np.float32)
    bad = ~np.isfinite(f) | (f < scale_floor(s.dtype))
    if bad.any():
        raise InternalError(
            f"Q/DQ scale {name} ({s.dtype}) holds {int(bad.sum())} zero, "
            f"subnormal or non-finite value(s), e.g. {f[bad][:3].tolist()}; "
            f"scales must be floored by store_scale (a bug in dsc)"
        )


# ---- weight quantization (numpy; deterministic) ---------------------------------------------


def quantize_weight(
    w: np.ndarray, scheme: QuantScheme, clip: np.ndarray | None = None, scale_dtype=np.float32
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(quantized weight, scale, DequantizeLinear attributes) for an [in, out] weight.

    The scale is per output channel ([out]; INT4: per block of input rows, [in/block, out]),
    stored in `scale_dtype` (the graph's float dtype) by `store_scale`: never zero or subnormal,
    so a dead channel (all-zero column) gets the floor and quantizes to zeros. The weight is
    quantized with the stored scale. `clip` (optional, AWQ's clip search): ratios ≤ 1 of the
    weight maxima that set the scales, [in/block, out] for INT4, [out] otherwise; values beyond
    are clipped to the quantized range. Equal to `weight_amax` → `weight_scale` →
    `quantize_with_scale`, which a caller may run on row chunks of a weight too large to hold
    in float32 (the vocabulary tables, `dsc.passes.quant.vocab`).
    """
    w = w.astype(np.float32)
    block = int4_block(w.shape[0], scheme.block_size) if scheme.precision == "int4" else None
    amax = weight_amax(w, block)
    if clip is not None:
        amax = amax * clip
    scale = weight_scale(amax, scheme.precision, scale_dtype)
    q = quantize_with_scale(w, scale, scheme.precision, block)
    return q, scale, ({"axis": 0, "block_size": block} if block else {"axis": 1})


def weight_amax(w: np.ndarray, block: int | None = None) -> np.ndarray:
    """|w| maxima of an [in, out] weight (or of consecutive rows of one), float32: per output
    channel, [out]; with `block` (INT4), per block of `block` input rows, [in/block, out]
    (`in` a multiple of `block`)."""
    a = np.abs(np.asarray(w, dtype=np.float32))
    if block:
        return a.reshape(a.shape[0] // block, block, a.shape[1]).max(axis=1)
    return a.max(axis=0)


def weight_scale(amax: np.ndarray, precision: str, scale_dtype=np.float32) -> np.ndarray:
    """The stored weight scale for `amax` (`weight_amax`'s maxima): max(amax, floor) / the
    format's largest value (127 for INT8, 7 for INT4, 448 for FP8 E4M3), by `store_scale`."""
    qmax = {"int8": INT8_MAX, "int4": INT4_MAX, "fp8": FP8_MAX}[precision]
    return store_scale(np.maximum(amax, WEIGHT_AMAX_FLOOR) / qmax, scale_dtype)


def quantize_with_scale(
    w: np.ndarray, scale: np.ndarray, precision: str, block: int | None = None
) -> np.ndarray:
    """An [in, out] weight (or consecutive rows of one, starting on a block edge) quantized
    with a stored `scale` ([out]; INT4: [in/block, out] for these rows): round to nearest and
    clip to [-127, 127] (INT8) or [-8, 7] (INT4, ml_dtypes.int4); FP8 E4M3 clipped to ±448
    before the cast (the stored scale may round below amax / 448, and E4M3 casts 464+ to NaN).
    """
    w = np.asarray(w, dtype=np.float32)
    s = np.asarray(scale).astype(np.float32)
    if precision == "int4":
        g = w.reshape(w.shape[0] // block, block, w.shape[1])
        q = np.clip(np.round(g / s[:, None, :]), -8, 7).reshape(w.shape)
        return q.astype(ml_dtypes.int4)
    if precision == "int8":
        return np.clip(np.round(w / s), -INT8_MAX, INT8_MAX).astype(np.int8)
    return np.clip(w / s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def dequantize_weight(q: np.ndarray, scale: np.ndarray, attrs: dict) -> np.ndarray:
    qf = q.astype(np.float32)
    scale = np.asarray(scale).astype(np.float32)
    if "block_size" in attrs:
        return qf * np.repeat(scale, attrs["block_size"], axis=attrs.get("axis", 1))
    return qf * scale


def quantize_grouped(
    w: np.ndarray,
    scheme: QuantScheme,
    in_axis: int = 0,
    groups: int = 1,
    clip: np.ndarray | None = None,
    scale_dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(quantized weight, scale, DequantizeLinear attributes) for a weight of any form.

    A 2-D [in, out] weight of one group is `quantize_weight`'s (per output channel; INT4 blocks
    along in). Otherwise each of the `groups` matrices (experts, heads) is quantized on its own
    by `quantize_weight` and the scales are laid out as one blocked DequantizeLinear along
    `in_axis` (opset 21; the scale has the weight's rank): block = the group's input size for
    INT8/FP8 (per group, per output channel), the INT4 block otherwise.
    """
    if w.ndim == 2 and groups == 1 and in_axis == 0:
        return quantize_weight(w, scheme, clip, scale_dtype)
    if w.ndim == 3 and in_axis == 1:
        canon = w
    elif w.ndim == 3 and in_axis == 2:
        canon = w.transpose(0, 2, 1)
    elif w.ndim == 2 and in_axis == 0 and w.shape[0] % groups == 0:
        canon = w.reshape(groups, w.shape[0] // groups, w.shape[1])
    else:
        raise ValueError(
            f"no quantized layout for a {w.shape} weight (input axis {in_axis}, {groups} groups)"
        )
    qs, ss, block = [], [], canon.shape[1]
    for g in range(canon.shape[0]):
        q, s, attrs = quantize_weight(
            np.ascontiguousarray(canon[g]), scheme, scale_dtype=scale_dtype
        )
        if "block_size" in attrs:
            block = attrs["block_size"]
        else:
            s = s[None, :]
        qs.append(q)
        ss.append(s)
    q, s = np.stack(qs), np.stack(ss)  # [G, in, out], [G, in / block, out]
    if w.ndim == 3 and in_axis == 2:
        q, s = q.transpose(0, 2, 1), s.transpose(0, 2, 1)
    elif w.ndim == 2:
        q, s = q.reshape(w.shape), s.reshape(-1, w.shape[1])
    return (
        np.ascontiguousarray(q),
        np.ascontiguousarray(s),
        {"axis": in_axis, "block_size": int(block)},
    )


def int4_block(in_dim: int, block: int = 128) -> int:
    """The block size along the input dim: `block`, or its largest divisor ≤ block for tiny dims."""
    if in_dim % block == 0:
        return block
    for b in range(min(block, in_dim), 0, -1):
        if in_dim % b == 0:
            if b != in_dim and b < 16:
                logger.info(
                    "int4: in-dim %d has no divisor ≥16 ≤ %d; one block per channel", in_dim, block
                )
                return in_dim if in_dim <= block else b
            return b
    return in_dim


def _act_scale(amax: float, precision: str, dtype) -> np.ndarray:
    """The activation's per-tensor scale, a 0-d array in `dtype` (see `store_scale`)."""
    qmax = FP8_MAX if precision == "fp8" else INT8_MAX
    return store_scale(np.array(max(float(amax), ACT_AMAX_FLOOR) / qmax), dtype)


class InsertQDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ from calibrated activation ranges (`{activation value name: amax}`)."""

    def __init__(
        self,
        ranges: dict[str, float] | None,
        scheme: QuantScheme,
        exclude=(),
        *,
        defaults: bool = True,
        clip: dict[str, np.ndarray] | None = None,
    ):
        super().__init__()
        self.ranges = dict(ranges or {})
        self.clip = dict(clip or {})  # weight initializer name -> clip ratios (AWQ)
        self.scheme = scheme
        self.exclude = tuple(exclude)
        self.defaults = defaults
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        scheme = self.scheme
        graph = model.graph
        targets = find_targets(model, self.exclude, defaults=self.defaults)
        layers, excluded, skipped, weight_only = {}, {}, {}, {}
        by_weight: dict[int, list[Target]] = {}
        for t in targets:
            if t.excluded:
                excluded[t.module] = t.reason
            else:
                by_weight.setdefault(id(t.weight), []).append(t)
        names = {
            v.name for n, _ in _walk(graph) for v in (*n.inputs, *n.outputs) if v is not None
        } | set(graph.initializers)
        act_dq: dict[tuple[int, str], ir.Value] = {}
        modified = blocked = False
        for ts in by_weight.values():
            act_range = {id(t): self._range(t) for t in ts}
            keep = []
            for t in ts:
                if not scheme.weight_only and act_range[id(t)] is None and not t.in_subgraph:
                    skipped[t.module] = "no calibrated range for its activation"
                else:
                    keep.append(t)
            if not keep:
                continue
            if len({t.in_axis for t in keep}) > 1:
                for t in keep:
                    skipped[t.module] = "its weight is read in layouts that disagree"
                continue
            w = keep[0].weight
            src = w.const_value
            w_np = read_tensor(src)
            fdtype = w_np.dtype
            groups = max(t.groups for t in keep)
            quant = (scheme, keep[0].in_axis, groups, self.clip.get(w.name))
            q, scale, attrs = quantize_grouped(w_np, *quant, scale_dtype=fdtype)
            del w_np
            check_scales(f"{w.name}_scale", scale)
            # The quantized weight is computed again when the graph is written (the same
            # numbers: deterministic), so no layer's weight stays in memory meanwhile.
            q = DerivedTensor(
                lambda src=src, quant=quant, fdtype=fdtype: ir.Tensor(
                    quantize_grouped(read_tensor(src), *quant, scale_dtype=fdtype)[0]
                ),
                ir.Tensor(q).dtype,
                ir.Shape(list(q.shape)),
                name=f"{w.name}_quantized",
                sources=(w.name,),
                source_tensors=(src,),
            )
            blocked |= "block_size" in attrs
            dq_out = self._weight_dq(graph, w, q, scale, attrs, keep)
            for t in keep:
                consumer = t.path[-1] if t.path else t.node
                for i, v in enumerate(consumer.inputs):
                    if v is w:
                        consumer.replace_input_with(i, dq_out)
                info = {
                    "weight": w.name,
                    "scheme": scheme.label,
                    "kind": t.kind,
                    "weight_scale_min": float(scale.min()),
                    "weight_scale_max": float(scale.max()),
                }
                if groups > 1 or t.kind != "linear":
                    per_block = (
                        f"per block of {attrs['block_size']} inputs, "
                        if scheme.precision == "int4"
                        else ""
                    )
                    info["scales"] = f"per expert/head ({groups}), {per_block}per output channel"
                if t.in_subgraph:
                    info["graph"] = t.graph.name
                if not scheme.weight_only:
                    r = act_range[id(t)]
                    if r is None:
                        weight_only[t.module] = (
                            "activation inside an If branch that calibration does not run "
                            "(decode only) and not a copy of a calibrated value: weight-only"
                        )
                        info["activation"] = None
                    else:
                        amax, src = r
                        self._act_qdq(graph, t, amax, src, fdtype, act_dq, names, info)
                layers[t.module] = info
            modified = True
            if not w.uses():
                graph.initializers.pop(w.name, None)
        if modified and blocked and model.opset_imports.get("", 0) < 21:
            model.opset_imports[""] = 21
            graph.opset_imports[""] = 21
        if modified:
            graph.sort()
        self.report = {"layers": layers, "excluded": excluded, "skipped": skipped}
        if weight_only:
            self.report["weight_only"] = weight_only
        return ir.passes.PassResult(model, modified)

    def _range(self, t: Target) -> tuple[float, str] | None:
        """(amax, calibrated value name) of the target's activation or of a value it copies."""
        for v in range_sources(t.activation):
            if v.name in self.ranges:
                return float(self.ranges[v.name]), v.name
        return None

    def _weight_dq(self, graph: ir.Graph, w: ir.Value, q, scale, attrs, targets) -> ir.Value:
        """One DequantizeLinear in the main graph for every reader of `w` (branches included:
        TensorRT-RTX refuses a quantized initializer read by a DQ inside an If branch)."""
        inputs = weight_dq_inputs(graph, w.name, q, scale, self.scheme.precision)
        dq = ir.node(
            "DequantizeLinear",
            inputs,
            attributes=attrs,
            name=f"{targets[0].name}/weight_dq",
            num_outputs=1,
        )
        dq.outputs[0].name = f"{w.name}_dq"
        dq.outputs[0].dtype = w.dtype
        dq.outputs[0].shape = w.shape
        # before the first main-graph node that reads w (itself or from one of its branches)
        readers = set()
        for n, owner in _walk(graph):
            if any(v is w for v in n.inputs):
                readers.add(id(owner if owner is not None else n))
        first = next(n for n in graph if id(n) in readers)
        graph.insert_before(first, dq)
        return dq.outputs[0]

    def _act_qdq(
        self,
        main: ir.Graph,
        t: Target,
        amax: float,
        src: str,
        fdtype,
        act_dq: dict,
        names: set,
        info: dict,
    ) -> None:
        """Q→DQ on the activation, in the MatMul's own graph, shared by its readers there."""
        scheme, a, g = self.scheme, t.activation, t.graph
        key = (id(g), a.name)
        if key not in act_dq:
            s = _act_scale(amax, scheme.precision, fdtype)
            check_scales(f"{a.name}_act_scale", s)
            zdtype = ml_dtypes.float8_e4m3fn if scheme.precision == "fp8" else np.int8
            sv_a = _const(_fresh(names, f"{a.name}_act_scale"), s)
            zv_a = _const(_fresh(names, f"{a.name}_act_zero_point"), np.zeros((), dtype=zdtype))
            main.register_initializer(sv_a)
            main.register_initializer(zv_a)
            qn = ir.node("QuantizeLinear", [a, sv_a, zv_a], name=_fresh(names, f"{a.name}/act_q"))
            dqn = ir.node(
                "DequantizeLinear",
                [qn.outputs[0], sv_a, zv_a],
                name=_fresh(names, f"{a.name}/act_dq"),
            )
            qn.outputs[0].name = _fresh(names, f"{a.name}_q")
            dqn.outputs[0].name = _fresh(names, f"{a.name}_dq")
            dqn.outputs[0].dtype = a.dtype
            dqn.outputs[0].shape = a.shape
            g.insert_before(t.node, [qn, dqn])
            act_dq[key] = dqn.outputs[0]
            info["act_amax"] = amax
            info["act_scale"] = float(s)
        t.node.replace_input_with(t.activation_input, act_dq[key])
        info["activation"] = a.name
        if src != a.name:
            info["act_range_from"] = src


def _const(name: str, arr: np.ndarray) -> ir.Value:
    t = ir.Tensor(np.asarray(arr), name=name)
    return ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype), const_value=t)


def _fresh(names: set, stem: str) -> str:
    """`stem`, or `stem_<n>` if a value or node of the model already has that name."""
    name, n = stem, 1
    while name in names:
        name, n = f"{stem}_{n}", n + 1
    names.add(name)
    return name


def strip_activation_qdq(model: ir.Model) -> int:
    """Remove every activation Q→DQ pair in place (weights stay quantized); returns how many.

    An activation pair is a QuantizeLinear whose input is not a constant, read only by
    DequantizeLinear nodes; their readers get the pair's float input back. Weight
    DequantizeLinear nodes (constant input) are kept, so the graph computes with the same
    dequantized weights and the same KV-cache path, without activation rounding. Used by the
    smoke check: one activation element rounded to the neighbouring step changes every value
    downstream, so decode and prefill of a Q/DQ graph differ by more than float noise even when
    the KV cache is right (see `dsc.pipeline.smoke`). Branch subgraphs included.
    """
    removed = 0
    for q, _ in list(_walk(model.graph)):
        if q.op_type != "QuantizeLinear":
            continue
        x = q.inputs[0]
        if x is None or x.const_value is not None or x.is_initializer():
            continue
        readers = [use.node for use in q.outputs[0].uses()]
        if not readers or any(
            r.op_type != "DequantizeLinear" or r.outputs[0].is_graph_output() for r in readers
        ):
            continue
        for dq in readers:
            ir.convenience.replace_all_uses_with(dq.outputs[0], x)
            dq.graph.remove(dq, safe=True)
        q.graph.remove(q, safe=True)
        removed += 1
    return removed
