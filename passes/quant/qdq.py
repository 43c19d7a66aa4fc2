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
(a DequantizeLinear producing fp16 needs an fp16 scale). INT4 blocked DequantizeLinear needs
opset 21; the pass raises the default-domain opset import to 21 when needed (opset 20 → 21
changes no operator this exporter emits except by widening type lists).

Idempotent: a MatMul whose weight already comes from a DequantizeLinear is skipped, so a second
run returns `modified=False`.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from dsc.validate.locate import module_path

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
            return "int4-awq (W4A16, block %d)" % self.block_size
        return f"{self.precision} {'weight-only' if self.weight_only else 'W8A8'}"


@dataclass
class Target:
    """A quantizable MatMul: activation input, 2-D weight initializer, module path."""

    node: ir.Node
    module: str
    activation: ir.Value
    weight: ir.Value
    excluded: bool = False
    reason: str = ""

    @property
    def name(self) -> str:
        return self.node.name


def matches(module: str, patterns) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, f"*{p}*") and "*" not in p:
            return p
    return None


def find_targets(model: ir.Model, exclude=(), *, defaults: bool = True) -> list[Target]:
    """Every MatMul whose second input is a 2-D float initializer (a linear layer), in order."""
    patterns = tuple(DEFAULT_EXCLUDE if defaults else ()) + tuple(exclude)
    out = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is None or w.const_value is None or len(w.shape or ()) != 2:
            continue
        mod = module_path(node) or node.name
        hit = matches(mod, patterns)
        out.append(Target(node, mod, node.inputs[0], w, excluded=hit is not None,
                          reason=f"excluded by {hit}" if hit else ""))
    return out


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


# ---- weight quantization (numpy; deterministic) ---------------------------------------------

def quantize_weight(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray, dict]:
    """(quantized weight, scale, DequantizeLinear attributes) for an [in, out] weight."""
    w = w.astype(np.float32)
    if scheme.precision == "int4":
        block = int4_block(w.shape[0], scheme.block_size)
        g = w.reshape(w.shape[0] // block, block, w.shape[1])
        scale = np.maximum(np.abs(g).max(axis=1), 1e-8) / INT4_MAX  # [in/block, out]
        q = np.clip(np.round(g / scale[:, None, :]), -8, 7).reshape(w.shape)
        return q.astype(ml_dtypes.int4), scale, {"axis": 0, "block_size": block}
    amax = np.maximum(np.abs(w).max(axis=0), 1e-8)  # per output channel
    if scheme.precision == "int8":
        scale = amax / INT8_MAX
        q = np.clip(np.round(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    else:
        scale = amax / FP8_MAX
        q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
    return q, scale, {"axis": 1}


def dequantize_weight(q: np.ndarray, scale: np.ndarray, attrs: dict) -> np.ndarray:
    qf = q.astype(np.float32)
    if "block_size" in attrs:
        b = attrs["block_size"]
        return (qf.reshape(-1, b, qf.shape[1]) * scale[:, None, :]).reshape(qf.shape)
    return qf * scale


def int4_block(in_dim: int, block: int = 128) -> int:
    """The block size along the input dim: `block`, or its largest divisor ≤ block for tiny dims."""
    if in_dim % block == 0:
        return block
    for b in range(min(block, in_dim), 0, -1):
        if in_dim % b == 0:
            if b != in_dim and b < 16:
                logger.info("int4: in-dim %d has no divisor ≥16 ≤ %d; one block per channel",
                            in_dim, block)
                return in_dim if in_dim <= block else b
            return b
    return in_dim


def _act_scale(amax: float, precision: str) -> float:
    qmax = FP8_MAX if precision == "fp8" else INT8_MAX
    return max(float(amax), 1e-6) / qmax


class InsertQDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ from calibrated activation ranges (`{activation value name: amax}`)."""

    def __init__(self, ranges: dict[str, float] | None, scheme: QuantScheme, exclude=(),
                 *, defaults: bool = True):
        super().__init__()
        self.ranges = dict(ranges or {})
        self.scheme = scheme
        self.exclude = tuple(exclude)
        self.defaults = defaults
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        scheme = self.scheme
        graph = model.graph
        targets = find_targets(model, self.exclude, defaults=self.defaults)
        layers, excluded, skipped = {}, {}, {}
        act_dq: dict[str, ir.Value] = {}
        modified = False
        for t in targets:
            if t.excluded:
                excluded[t.module] = t.reason
                continue
            if t.weight.producer() is not None:  # already behind a DequantizeLinear
                continue
            if not scheme.weight_only and t.activation.name not in self.ranges:
                skipped[t.module] = "no calibrated range for its activation"
                continue
            w_np = t.weight.const_value.numpy()
            fdtype = w_np.dtype
            irdt = t.weight.dtype
            q, scale, attrs = quantize_weight(w_np, scheme)
            qv = ir.Value(name=f"{t.weight.name}_quantized", shape=ir.Shape(q.shape),
                          type=ir.TensorType(ir.Tensor(q).dtype), const_value=ir.Tensor(q))
            sv = _const(f"{t.weight.name}_scale", scale.astype(fdtype))
            graph.register_initializer(qv)
            graph.register_initializer(sv)
            inputs = [qv, sv]
            if scheme.precision != "int4":
                zp = np.zeros(scale.shape, dtype=q.dtype)
                zv = _const(f"{t.weight.name}_zero_point", zp)
                graph.register_initializer(zv)
                inputs.append(zv)
            dq = ir.node("DequantizeLinear", inputs, attributes=attrs,
                         name=f"{t.name}/weight_dq", num_outputs=1)
            dq.outputs[0].name = f"{t.weight.name}_dq"
            dq.outputs[0].dtype = irdt
            dq.outputs[0].shape = t.weight.shape
            graph.insert_before(t.node, dq)
            t.node.replace_input_with(1, dq.outputs[0])
            info = {"weight": t.weight.name, "scheme": scheme.label,
                    "weight_scale_min": float(scale.min()), "weight_scale_max": float(scale.max())}
            if not scheme.weight_only:
                a = t.activation
                if a.name not in act_dq:
                    s = _act_scale(self.ranges[a.name], scheme.precision)
                    zdtype = ml_dtypes.float8_e4m3fn if scheme.precision == "fp8" else np.int8
                    sv_a = _const(f"{a.name}_act_scale", np.array(s, dtype=fdtype))
                    zv_a = _const(f"{a.name}_act_zero_point", np.zeros((), dtype=zdtype))
                    graph.register_initializer(sv_a)
                    graph.register_initializer(zv_a)
                    qn = ir.node("QuantizeLinear", [a, sv_a, zv_a], name=f"{a.name}/act_q")
                    dqn = ir.node("DequantizeLinear", [qn.outputs[0], sv_a, zv_a],
                                  name=f"{a.name}/act_dq")
                    qn.outputs[0].name = f"{a.name}_q"
                    dqn.outputs[0].name = f"{a.name}_dq"
                    dqn.outputs[0].dtype = a.dtype
                    dqn.outputs[0].shape = a.shape
                    graph.insert_before(t.node, [qn, dqn])
                    act_dq[a.name] = dqn.outputs[0]
                    info["act_amax"] = float(self.ranges[a.name])
                    info["act_scale"] = s
                t.node.replace_input_with(0, act_dq[a.name])
                info["activation"] = a.name
            layers[t.module] = info
            modified = True
            # The float weight is now unused: drop it so the graph does not carry both.
            if not t.weight.uses():
                graph.initializers.pop(t.weight.name, None)
        if modified and scheme.precision == "int4" and model.opset_imports.get("", 0) < 21:
            model.opset_imports[""] = 21
            graph.opset_imports[""] = 21
        if modified:
            graph.sort()
        self.report = {"layers": layers, "excluded": excluded, "skipped": skipped}
        return ir.passes.PassResult(model, modified)


def _const(name: str, arr: np.ndarray) -> ir.Value:
    t = ir.Tensor(np.asarray(arr), name=name)
    return ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype),
                    const_value=t)
