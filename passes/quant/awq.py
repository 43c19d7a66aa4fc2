"""AWQScalePass: activation-aware weight scaling before INT4 (group-128) weight-only quantization.

For an activation X (calibration rows sampled by `calibrate`) read by linear layers W_k, AWQ
searches per-input-channel scales s = mean|X_j|^α (normalised), α on a grid over [0, 1], and
keeps the α minimising Σ_k ||X W_k - (X/s) Q(diag(s) W_k)||² where Q is the INT4 blocked
quantize-dequantize that `InsertQDQPass` will apply. Salient input channels (large activations)
get scaled up before rounding, so their weights lose less precision. α = 0 is plain
round-to-nearest, so the search never does worse than RTN on the calibration rows.

Like SmoothQuant, 1/s is folded into the preceding RMSNorm gamma; activations not produced by a
norm (o_proj, down_proj) or also read by other ops keep s = 1 (plain RTN) and are reported.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from dsc.passes.quant.qdq import QuantScheme, dequantize_weight, quantize_weight
from dsc.passes.quant.smoothquant import apply_scales, smoothable_groups

logger = logging.getLogger(__name__)

GRID = tuple(i / 20 for i in range(21))


def _qdq(w: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    q, s, attrs = quantize_weight(w, scheme)
    return dequantize_weight(q, s, attrs)


def search_scale(rows: np.ndarray, meanabs: np.ndarray, weights: list[np.ndarray],
                 scheme: QuantScheme, grid=GRID) -> tuple[np.ndarray, float, float, float]:
    """(best s, best α, error at best α, error at α=0) on the calibration rows."""
    x = rows.astype(np.float32)
    ws = [w.astype(np.float32) for w in weights]
    ref = [x @ w for w in ws]
    m = np.maximum(meanabs.astype(np.float64), 1e-6)
    best = (np.ones_like(meanabs, dtype=np.float32), 0.0, np.inf)
    err0 = np.inf
    for a in grid:
        s = m ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        for w, y in zip(ws, ref):
            wq = _qdq(w * s[:, None], scheme)
            err += float(np.mean(((x / s) @ wq - y) ** 2))
        if a == 0.0:
            err0 = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], best[2], err0


class AWQScalePass(ir.passes.InPlacePass):
    """Fold AWQ scales (searched on calibration rows) into norm gammas and weight rows."""

    def __init__(self, stats, scheme: QuantScheme | None = None, exclude=(), grid=GRID):
        super().__init__()
        self.stats = stats
        self.scheme = scheme or QuantScheme("int4", weight_only=True)
        self.exclude, self.grid = tuple(exclude), tuple(grid)
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups, skipped = smoothable_groups(model, self.exclude)
        done = {}
        for name, (gamma, ts) in groups.items():
            st = self.stats.acts.get(name)
            if st is None or st.rows.shape[0] == 0:
                skipped[name] = "no calibration rows"
                continue
            if gamma.meta.get("dsc.awq"):
                continue
            s, alpha, err, err0 = search_scale(
                st.rows, st.meanabs, [t.weight.const_value.numpy() for t in ts], self.scheme,
                self.grid)
            if alpha == 0.0:
                skipped[name] = "α=0 (round-to-nearest) was best"
                continue
            apply_scales(gamma, ts, s)
            gamma.meta["dsc.awq"] = True
            done[name] = {"layers": [t.module for t in ts], "alpha": alpha,
                          "mse": err, "mse_rtn": err0}
        self.report = {"scaled": done, "skipped": skipped}
        return ir.passes.PassResult(model, bool(done))
