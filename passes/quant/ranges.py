"""Activation ranges (amax) from calibration histograms: max, percentile, entropy (KL), MSE.

All methods read the |x| histogram collected by `calibrate` (2048 bins over [0, hist_max]) and
return the symmetric clipping threshold amax; the scale is amax / qmax (127 for INT8, 448 for
FP8 E4M3).

- max: the largest |x| seen.
- percentile: the `percentile`-th percentile of |x| (default 99.99).
- entropy: TensorRT's KL-divergence calibration: the threshold whose 128-level quantized
  distribution is closest (KL) to the clipped reference distribution.
- mse: the threshold minimising expected squared error (clipping + uniform rounding) over the
  histogram, with the rounding error model of the target grid (uniform for INT8, relative for
  FP8).
"""

from __future__ import annotations

import numpy as np

METHODS = ("max", "percentile", "entropy", "mse")


def _centers(hist: np.ndarray, hmax: float) -> np.ndarray:
    w = hmax / hist.size
    return (np.arange(hist.size) + 0.5) * w


def amax_max(hist: np.ndarray, hmax: float, absmax: float) -> float:
    return float(absmax)


def amax_percentile(hist: np.ndarray, hmax: float, absmax: float, pct: float = 99.99) -> float:
    c = np.cumsum(hist)
    if c[-1] == 0:
        return float(absmax)
    i = int(np.searchsorted(c, c[-1] * pct / 100.0))
    return float(min((i + 1) * hmax / hist.size, absmax))


def amax_entropy(hist: np.ndarray, hmax: float, absmax: float, levels: int = 128) -> float:
    hist = hist.astype(np.float64)
    nb = hist.size
    if hist.sum() == 0:
        return float(absmax)
    best, best_i = np.inf, nb
    for i in range(levels, nb + 1, max(1, nb // 256)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nz = p > 0
        # quantize the first i bins into `levels` groups; expand back over non-empty bins
        edges = np.linspace(0, i, levels + 1).astype(int)
        q = np.zeros(i)
        src = hist[:i]
        for a, b in zip(edges[:-1], edges[1:], strict=False):
            if b <= a:
                continue
            seg = src[a:b]
            n = np.count_nonzero(seg)
            if n:
                q[a:b] = np.where(seg > 0, seg.sum() / n, 0.0)
        q[-1] += 0  # outliers are clipped into the last quantized bin's reference only
        ps, qs = p[nz] / p.sum(), q[nz]
        if qs.sum() == 0 or np.any(qs == 0):
            qs = np.where(qs == 0, 1e-12, qs)
        qs = qs / qs.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best:
            best, best_i = kl, i
    return float(min(best_i * hmax / nb, absmax))


def amax_mse(hist: np.ndarray, hmax: float, absmax: float, precision: str = "int8") -> float:
    x = _centers(hist, hmax)
    h = hist.astype(np.float64)
    if h.sum() == 0:
        return float(absmax)
    best, best_a = np.inf, absmax
    for a in np.linspace(absmax / 64, absmax, 256):
        inside = x <= a
        clip = np.sum(h[~inside] * (x[~inside] - a) ** 2)
        if precision == "fp8":
            # E4M3 has 3 mantissa bits: rounding error ~ (x * 2^-4)^2 / 3, floor at the
            # subnormal step
            step = np.maximum(x[inside] * 2.0**-3, a / 448.0 * 2.0**-9)
        else:
            step = np.full(inside.sum(), a / 127.0)
        rnd = np.sum(h[inside] * step**2 / 12.0)
        err = clip + rnd
        if err < best:
            best, best_a = err, a
    return float(best_a)


def compute_amax(
    stats, method: str = "max", precision: str = "int8", percentile: float = 99.99
) -> dict[str, float]:
    """`{activation name: amax}` for every activation in `stats` (a CalibStats)."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    out = {}
    for name, s in stats.acts.items():
        absmax = s.amax
        if method == "max":
            a = absmax
        elif method == "percentile":
            a = amax_percentile(s.hist, s.hist_max, absmax, percentile)
        elif method == "entropy":
            a = amax_entropy(s.hist, s.hist_max, absmax)
        else:
            a = amax_mse(s.hist, s.hist_max, absmax, precision)
        out[name] = max(float(a), 1e-6)
    return out
