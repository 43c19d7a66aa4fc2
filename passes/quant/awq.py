"""AWQScalePass: activation-aware scaling and clipping before INT4 (group-128) weight-only
quantization.

Two searches on the calibration rows X (sampled by `calibrate`), as llm-awq does:

1. scales (`auto_scale`): for an activation read by linear layers W_k, per-input-channel scales
   s = mean|X_j|^α (normalised), α on a grid over [0, 1], keeping the α minimising
   Σ_k ||X W_k - (X/s) Q(diag(s) W_k)||², Q the INT4 blocked quantize-dequantize that
   `InsertQDQPass` applies. Salient input channels get scaled up before rounding, so their
   weights lose less precision. α = 0 is plain round-to-nearest, so the search never does worse
   than RTN on the rows. 1/s is folded exactly into what produces X (`dsc.passes.quant.fold`):
   a norm gamma (q/k/v, gate/up, MLA q_b/kv_b), the up projection's columns (down_proj), v_proj's
   or kv_b_proj's value columns (o_proj; GQA ties the scales of the query heads sharing a KV
   head). Activations with nowhere exact to fold keep s = 1 (plain RTN) and are reported.
2. clipping (`auto_clip`): per INT4 block and output channel, the ratio r ≤ 1 of the block's
   max|w| that sets its scale (r·max/7; values beyond clip to the INT4 range [-8, 7]), chosen on
   a grid by coordinate descent over the blocks of each layer on the exact output error
   ||(X/s)(W - Q_r(W))||² per output channel. r = 1 (no clipping) is a candidate at every step,
   so the error never rises above unclipped RTN. The ratios go to `InsertQDQPass(clip=...)`
   through `AWQScalePass.clip` ({weight initializer name: [in/block, out] ratios}).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dsc.passes._ir import read_consts
from dsc.passes.quant.qdq import (
    INT4_MAX,
    QuantScheme,
    dequantize_weight,
    find_targets,
    int4_block,
    quantize_weight,
)
from dsc.passes.quant.smoothquant import apply_scales, smoothable_groups

GRID = tuple(i / 20 for i in range(21))
CLIP_GRID = tuple(1.0 - i / 40 for i in range(1, 21))  # 0.975 .. 0.5 (1.0 is always a candidate)


def _qdq(w: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    return dequantize_weight(*quantize_weight(w, scheme))


def search_scale(
    rows: np.ndarray, meanabs: np.ndarray, weights: list[np.ndarray], scheme: QuantScheme, grid=GRID
) -> tuple[np.ndarray, float, float, float]:
    """(best s, best α, error at best α, error at α=0) on the calibration rows."""
    x = rows.astype(np.float32)
    ws = [w.astype(np.float32) for w in weights]
    ref = [x @ w for w in ws]
    m = np.maximum(meanabs.astype(np.float64), 1e-6)
    best = (np.ones_like(meanabs, dtype=np.float32), 0.0, np.inf)
    err0 = np.inf
    for a in grid:
        s = m**a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        for w, y in zip(ws, ref, strict=False):
            wq = _qdq(w * s[:, None], scheme)
            err += float(np.mean(((x / s) @ wq - y) ** 2))
        if a == 0.0:
            err0 = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], best[2], err0


def search_clip(
    rows: np.ndarray, w: np.ndarray, scheme: QuantScheme, grid=CLIP_GRID, sweeps: int = 2
) -> tuple[np.ndarray, float, float]:
    """(clip ratios [in/block, out], error with them, error without clipping) on `rows`.

    rows: [n, in] calibration rows (any float dtype), w: [in, out] weight; errors are mean
    squared output errors ||X (W - Q(W))||² / (n * out), computed on the rows in float64.

    Coordinate descent: for each block in turn, every output channel takes the ratio that
    minimises its whole output error given the other blocks' current choice (the columns are
    independent). With X_g the block's rows-slice, Δ its W - Q(W) and B the residual of the
    other blocks, ||B + X_g Δ||² = ||B||² + Σ(2 X_gᵀB + G_g Δ) ∘ Δ column by column, G_g = X_gᵀX_g
    ([b, b]). Each candidate ratio then costs a [b, b] @ [b, out] product instead of an
    [n, b] @ [b, out] one plus an [n, out] residual (n = 1,024 rows, b = 128: 8× fewer flops,
    and the residual is touched twice per block, not once per ratio). Same choices as scoring
    the residual directly, up to float32 rounding in near-ties.
    """
    x = np.asarray(rows, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    n_in, n_out = w.shape
    b = int4_block(n_in, scheme.block_size)
    nb = n_in // b
    wg = w.reshape(nb, b, n_out)
    amax = np.abs(wg).max(axis=1)
    xs = [np.ascontiguousarray(x[:, g * b : (g + 1) * b]) for g in range(nb)]
    grams = [xg.T @ xg for xg in xs]  # nb × [b, b]: 4.6 MB for a 8,960-wide down_proj

    def delta(g: int, r) -> np.ndarray:  # W - Q(W) of block g; the scale rule of quantize_weight
        sc = np.maximum(amax[g] * r, 1e-8) / INT4_MAX
        return wg[g] - np.clip(np.round(wg[g] / sc), -8, 7) * sc

    ratios = np.ones((nb, n_out), np.float32)
    d = [delta(g, 1.0) for g in range(nb)]
    res = x @ np.concatenate(d, axis=0)
    denom = max(x.shape[0] * n_out, 1)
    err0 = float(np.sum(res.astype(np.float64) ** 2)) / denom
    for _ in range(sweeps):
        changed = False
        for g in range(nb):
            gram = grams[g]
            t2 = 2.0 * (xs[g].T @ res - gram @ d[g])  # 2 X_gᵀB, B = res without block g

            def score(dr: np.ndarray, t2=t2, gram=gram) -> np.ndarray:
                return np.einsum("ij,ij->j", t2 + gram @ dr, dr)  # ||B + X_g dr||² - ||B||²

            best = score(d[g])
            cur = d[g].copy()
            moved = False
            for r in grid:
                dr = delta(g, r)
                e = score(dr)
                better = e < best
                if better.any():
                    best = np.where(better, e, best)
                    cur[:, better] = dr[:, better]
                    ratios[g, better] = r
                    moved = True
            if moved:
                res += xs[g] @ (cur - d[g])
                d[g] = cur
                changed = True
        if not changed:
            break
    return ratios, float(np.sum(res.astype(np.float64) ** 2)) / denom, err0


class AWQScalePass(ir.passes.InPlacePass):
    """Fold AWQ scales (searched on calibration rows) into producers and weight rows; search
    INT4 clip ratios for every quantizable linear layer (`self.clip`, for `InsertQDQPass`)."""

    def __init__(
        self,
        stats,
        scheme: QuantScheme | None = None,
        exclude=(),
        grid=GRID,
        clip_grid=CLIP_GRID,
        *,
        clip: bool = True,
    ):
        super().__init__()
        self.stats = stats
        self.scheme = scheme or QuantScheme("int4", weight_only=True)
        self.exclude, self.grid, self.clip_grid = tuple(exclude), tuple(grid), tuple(clip_grid)
        self.search_clip = clip and self.scheme.precision == "int4"
        self.report: dict = {}
        self.clip: dict[str, np.ndarray] = {}
        self.scales: dict[str, np.ndarray] = {}  # activation name -> s (X became X / s)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups, skipped = smoothable_groups(model, self.exclude)
        done, scales = {}, {}
        for name, (fold, ts) in groups.items():
            st = self.stats.acts.get(name)
            if st is None or st.rows.shape[0] == 0:
                skipped[name] = "no calibration rows"
                continue
            act = ts[0].activation
            if act.meta.get("dsc.awq"):
                continue
            s, alpha, err, err0 = search_scale(
                st.rows,
                fold.tie(st.meanabs, "mean"),
                read_consts(*(t.weight for t in ts)),
                self.scheme,
                self.grid,
            )
            if alpha == 0.0:
                skipped[name] = "α=0 (round-to-nearest) was best"
                continue
            apply_scales(fold, ts, s)
            act.meta["dsc.awq"] = True
            scales[name] = s
            done[name] = {
                "layers": [t.module for t in ts],
                "alpha": alpha,
                "mse": err,
                "mse_rtn": err0,
                "fold": fold.describe(),
            }
        self.scales = scales
        clipped = self._clip(model, scales) if self.search_clip else {}
        self.report = {"scaled": done, "skipped": skipped, "clipped": clipped}
        return ir.passes.PassResult(model, bool(done))

    def _clip(self, model: ir.Model, scales: dict[str, np.ndarray]) -> dict:
        out = {}
        for t in find_targets(model, self.exclude):
            if (
                t.excluded
                or getattr(t, "kind", "linear") != "linear"
                or getattr(t, "in_subgraph", False)
                or t.weight.producer() is not None
                or t.weight.const_value is None
                or len(t.weight.shape or ()) != 2
            ):
                continue
            st = self.stats.acts.get(t.activation.name)
            if st is None or st.rows.shape[0] == 0:
                continue
            rows = st.rows
            if t.activation.name in scales:
                rows = rows / scales[t.activation.name]
            ratios, err, err0 = search_clip(
                rows, read_consts(t.weight)[0], self.scheme, self.clip_grid
            )
            if err < err0:
                self.clip[t.weight.name] = ratios
            out[t.module] = {
                "mse": err,
                "mse_unclipped": err0,
                "mean_ratio": float(ratios.mean()),
                "clipped_fraction": float(np.mean(ratios < 1.0)),
            }
        return out
