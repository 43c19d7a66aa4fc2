"""SmoothQuantPass: migrate activation outliers into the weights before W8A8 quantization.

For an activation X read by linear layers W_k ([in, out] initializers), per input channel j

    s_j = max|X_j|^α / max_k max_o |W_k[j, o]|^(1-α)

then X' = X / s and W_k' = diag(s) W_k leave X W unchanged while flattening X's channel outliers.
1/s is folded into what produces X (`dsc.passes.quant.fold`), so the graph gains no op: a norm's
gamma (exported `Mul(gamma, normed)` or fused `RMSNormalization`) for q/k/v (q_a/kv_a, q_b,
kv_b through the MLA cache) and gate/up; the up projection's output columns for down_proj (the
SwiGLU product is linear in up); v_proj's (or MLA kv_b_proj's value) columns for o_proj, with
one scale per KV channel under GQA. Where X is also read by something other than a smoothable
linear (a MoE layer's router and experts read the same norm output) or 1/s has nowhere exact to
go, smoothing is skipped for that activation and the report says why.

The output error of the fake-quantized GEMMs on the calibration rows (per-tensor INT8 activation
at its calibrated max, per-channel INT8 weights) decides two things: with `guard` (default) a
group is smoothed only if that lowers the error (else s = 1, and the report gives both errors);
with `alpha=None` each group takes the α of `ALPHA_GRID` with the lowest error.

The down projection's input, the SwiGLU product, is left unsmoothed unless `gated=True`: the
first token (BOS) and delimiters put massive activations there, and calibration windows cut
from running text contain no BOS. Scales fitted without it shrink the per-tensor range that
the BOS activation then overflows: on tiny-qwen2 W8A8, smoothing that input lowers the mean KL
on held-out text (0.0023 -> 0.0012) but drops the logit cosine at the BOS position from 0.989
to 0.944, below the gate's 0.97, and hurts text that starts every window with BOS (see
docs/BENCHMARKS.md). With BOS-led calibration windows it is worth enabling: `dsc.quantize`
calibrates INT8 W8A8 on such windows and passes `gated=True`.

Calibrate again after this pass: the activation ranges change.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dsc.passes._ir import read_consts
from dsc.passes.quant.fold import Fold, find_fold
from dsc.passes.quant.qdq import Target, find_targets

ALPHA_GRID = tuple(i / 20 for i in range(1, 21))
GATED_SKIP = (
    "gated product (SwiGLU SiLU(gate) * up, the down projection's input): not smoothed "
    "unless gated=True; its token-specific massive activations (BOS, delimiters) may be "
    "missing from the calibration text, and scales fitted without them clip them"
)


def smoothable_groups(model: ir.Model, exclude=()) -> tuple[dict, dict]:
    """({activation name: (fold, [targets])}, {activation name: reason not smoothable})."""
    targets = [
        t
        for t in find_targets(model, exclude)
        if getattr(t, "kind", "linear") == "linear" and not getattr(t, "in_subgraph", False)
    ]
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
        if any(t.weight.producer() is not None for t in ts):
            skipped[name] = "already quantized"
            continue
        fold, why = find_fold(act)
        if fold is None:
            skipped[name] = why
            continue
        if fold.tensor.name in {t.weight.name for t in ts}:
            skipped[name] = "1/s would go into a weight of the same layers"
            continue
        groups[name] = (fold, ts)
    return groups, skipped


def apply_scales(fold: Fold, targets: list[Target], s: np.ndarray) -> None:
    """1/s into the fold, W_k[j, :] *= s (in float32, stored back in each tensor's dtype);
    each rescaled tensor is computed when read (`derive_in_place`), not held."""
    from dsc.passes._ir import derive_in_place

    fold.apply(s)
    col = s[:, None].astype(np.float32)
    for t in targets:
        derive_in_place(t.weight, lambda w, col=col: (w.astype(np.float32) * col).astype(w.dtype))


def _fake_int8(x: np.ndarray, amax: float) -> np.ndarray:
    sc = max(float(amax), 1e-6) / 127.0
    return np.clip(np.round(x / sc), -127, 127) * sc


# Output columns per block in `gemm_error`: per-channel weight scales are per output column,
# so blocks quantize exactly as the whole weight does, and a block's float32 temporaries
# (1536 x 512 x 4 B = 3 MiB at 1.5B) stay off the page-fault path that whole-weight ones take.
# Measured on a 1536 x 8960 pair with 1024 rows: 6.2 s -> 3.5 s per α.
GEMM_ERROR_COLUMNS = 512


def gemm_error(
    rows: np.ndarray,
    absmax: np.ndarray,
    weights: list[np.ndarray],
    s: np.ndarray,
    refs: list[np.ndarray] | None = None,
) -> float:
    """Sum over `weights` of the mean squared output error of the W8A8 GEMMs on `rows`
    ([n, in]) with smoothing scales `s` ([in]); each weight [in, out], errors in squared
    output units.

    `refs`: the float outputs `rows @ w` of each weight (float32), when the caller evaluates
    many `s` for the same weights: they do not depend on `s` (computing them once halves the
    α search, the longest part of an INT8 quantization at 1.5B). Computed per block of
    `GEMM_ERROR_COLUMNS` output columns, summed in float64."""
    from dsc.passes.quant.qdq import QuantScheme, dequantize_weight, quantize_weight

    x = rows.astype(np.float32)
    xs = _fake_int8(x / s, float((absmax / s).max()))
    err = 0.0
    for k, w in enumerate(weights):
        sq = 0.0
        for c0 in range(0, w.shape[1], GEMM_ERROR_COLUMNS):
            wc = w[:, c0 : c0 + GEMM_ERROR_COLUMNS].astype(np.float32)
            q, sc, attrs = quantize_weight(wc * s[:, None], QuantScheme("int8"))
            ref = refs[k][:, c0 : c0 + GEMM_ERROR_COLUMNS] if refs is not None else x @ wc
            d = xs @ dequantize_weight(q, sc, attrs) - ref
            sq += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        err += sq / (x.shape[0] * w.shape[1])
    return err


class SmoothQuantPass(ir.passes.InPlacePass):
    """Fold SmoothQuant scales into producers and weight rows.

    `stats`: a `CalibStats` (per-channel max|X| and activation rows, for the guard and the α
    search) or a plain `{activation name: per-channel max|X|}` (fixed α, no guard).
    `alpha=None`: α per activation from `grid`, the one with the lowest calibration-row GEMM
    error (no smoothing is a candidate too).
    """

    def __init__(
        self,
        stats,
        alpha: float | None = 0.5,
        exclude=(),
        *,
        guard: bool = True,
        grid=ALPHA_GRID,
        gated: bool = False,
    ):
        super().__init__()
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
        acts = getattr(stats, "acts", None)
        if alpha is None and acts is None:
            raise ValueError("a per-layer α search needs calibration rows (pass the CalibStats)")
        self.absmax = {k: v.absmax for k, v in acts.items()} if acts is not None else dict(stats)
        # The statistics, not their rows: spilled rows are mapped only while their group runs.
        self._row_stats = acts if acts is not None and (guard or alpha is None) else {}
        self.alpha, self.exclude = (None if alpha is None else float(alpha)), tuple(exclude)
        self.grid, self.gated = tuple(grid), gated
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups, skipped = smoothable_groups(model, self.exclude)
        done = {}
        for name, (fold, ts) in groups.items():
            if name not in self.absmax:
                skipped[name] = "no calibration statistics"
                continue
            act = ts[0].activation
            if act.meta.get("dsc.smoothed"):
                continue
            if fold.gated and not self.gated:
                skipped[name] = GATED_SKIP
                continue
            xmax = np.maximum(self.absmax[name].astype(np.float64), 1e-5)
            weights = read_consts(*(t.weight for t in ts))  # copies; memory maps released
            wmax = np.max([np.abs(w.astype(np.float64)).max(axis=1) for w in weights], axis=0)
            wmax = np.maximum(wmax, 1e-5)
            xt, wt = fold.tie(xmax, "max"), fold.tie(wmax, "max")
            st = self._row_stats.get(name)
            rows = None if st is None else np.array(st.rows, dtype=np.float32)
            if self.alpha is None and (rows is None or not rows.shape[0]):
                skipped[name] = "no calibration rows for the α search"
                continue
            best = None
            have_rows = rows is not None and rows.shape[0]
            refs = (
                [rows.astype(np.float32) @ w.astype(np.float32) for w in weights]
                if have_rows
                else None
            )
            for a in [self.alpha] if self.alpha is not None else self.grid:
                s = (xt**a / wt ** (1 - a)).clip(1e-4, 1e4).astype(np.float32)
                e = gemm_error(rows, xmax, weights, s, refs) if have_rows else None
                if best is None or e < best[2]:
                    best = (a, s, e)
            a, s, e1 = best
            info = {
                "layers": [t.module for t in ts],
                "alpha": a,
                "fold": fold.describe(),
                "scale_min": float(s.min()),
                "scale_max": float(s.max()),
            }
            if e1 is not None:
                e0 = gemm_error(rows, xmax, weights, np.ones_like(s), refs)
                info.update(mse=e1, mse_unsmoothed=e0)
                if e1 >= e0:
                    skipped[name] = (
                        f"smoothing raised the calibration-row GEMM error "
                        f"({e1:.3g} vs {e0:.3g} unsmoothed)"
                    )
                    continue
            apply_scales(fold, ts, s)
            act.meta["dsc.smoothed"] = True
            done[name] = info
        self.report = {
            "alpha": "per layer" if self.alpha is None else self.alpha,
            "smoothed": done,
            "skipped": skipped,
        }
        return ir.passes.PassResult(model, bool(done))
