"""SmoothQuantPass: migrate activation outliers into the weights before W8A8 quantization.

For an activation X read by linear layers W_k ([in, out] initializers), per input channel j

    s_j = max|X_j|^α / max_k max_o |W_k[j, o]|^(1-α)

then X' = X / s and W_k' = diag(s) W_k leave X W unchanged while flattening X's channel outliers.
1/s is folded into the preceding RMSNorm gamma (`Mul(gamma, normed)` with gamma a 1-D
initializer), so the graph gains no op: this covers q_a/kv_a (or q/k/v) and gate/up projections.
Where X does not come straight from a norm (o_proj, down_proj), or is also read by something
other than a smoothable linear (a MoE layer's router and experts read the same norm output),
smoothing is skipped for that activation and the report says so.

Calibrate again after this pass: the activation ranges change.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from dsc.passes.quant.qdq import Target, find_targets

logger = logging.getLogger(__name__)


def smoothable_groups(model: ir.Model, exclude=()) -> tuple[dict, dict]:
    """({activation name: (gamma value, [targets])}, {activation name: reason not smoothable})."""
    targets = find_targets(model, exclude)
    by_act: dict[str, list[Target]] = {}
    for t in targets:
        by_act.setdefault(t.activation.name, []).append(t)
    groups, skipped = {}, {}
    for name, ts in by_act.items():
        act = ts[0].activation
        if any(t.excluded for t in ts):
            skipped[name] = "read by an excluded layer"
            continue
        consumers = {id(u) for u, _ in act.uses()}
        if consumers != {id(t.node) for t in ts}:
            skipped[name] = "also read by a non-linear or unquantized op (router, experts, ...)"
            continue
        p = act.producer()
        gamma = None
        if p is not None and p.op_type == "Mul":
            for i in p.inputs:
                if i is not None and i.const_value is not None and len(i.shape or ()) == 1 \
                        and len(i.uses()) == 1 and i.shape[0] == ts[0].weight.shape[0]:
                    gamma = i
        if gamma is None:
            skipped[name] = "not produced by a norm's gamma Mul (nothing to fold 1/s into)"
            continue
        if any(t.weight.producer() is not None for t in ts):
            skipped[name] = "already quantized"
            continue
        groups[name] = (gamma, ts)
    return groups, skipped


def apply_scales(gamma: ir.Value, targets: list[Target], s: np.ndarray) -> None:
    """gamma /= s, W_k[j, :] *= s (in float32, stored back in each tensor's dtype)."""
    g = gamma.const_value.numpy()
    gamma.const_value = ir.Tensor((g.astype(np.float32) / s).astype(g.dtype), name=gamma.name)
    for t in targets:
        w = t.weight.const_value.numpy()
        t.weight.const_value = ir.Tensor((w.astype(np.float32) * s[:, None]).astype(w.dtype),
                                         name=t.weight.name)


class SmoothQuantPass(ir.passes.InPlacePass):
    """Fold SmoothQuant scales into norm gammas and weight rows (`absmax`: per-channel max|X|)."""

    def __init__(self, absmax: dict[str, np.ndarray], alpha: float = 0.5, exclude=()):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
        self.absmax, self.alpha, self.exclude = absmax, float(alpha), tuple(exclude)
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups, skipped = smoothable_groups(model, self.exclude)
        done = {}
        for name, (gamma, ts) in groups.items():
            if name not in self.absmax:
                skipped[name] = "no calibration statistics"
                continue
            if gamma.meta.get("dsc.smoothed"):
                continue
            xmax = np.maximum(self.absmax[name].astype(np.float64), 1e-5)
            wmax = np.max([np.abs(t.weight.const_value.numpy().astype(np.float64)).max(axis=1)
                           for t in ts], axis=0)
            wmax = np.maximum(wmax, 1e-5)
            s = (xmax ** self.alpha / wmax ** (1 - self.alpha)).clip(1e-4, 1e4).astype(np.float32)
            apply_scales(gamma, ts, s)
            gamma.meta["dsc.smoothed"] = True
            done[name] = {"layers": [t.module for t in ts], "scale_min": float(s.min()),
                          "scale_max": float(s.max())}
        self.report = {"alpha": self.alpha, "smoothed": done, "skipped": skipped}
        return ir.passes.PassResult(model, bool(done))
