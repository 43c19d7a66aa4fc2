"""Accuracy metrics of candidate logits against reference logits (numpy, float64 inside).

All functions take logits shaped [..., vocab] and reduce over every leading position.

- cosine: cosine similarity of the logit vectors: mean, 1st percentile (`cosine_p01`: 99% of
  positions are at least this similar) and worst position
- max_abs: the largest absolute logit difference
- kl: mean KL(reference || candidate) of the softmax distributions, in nats
- top1: fraction of positions where both argmaxes agree
- top5: fraction of positions where the reference's argmax is in the candidate's top 5
- nll / perplexity of a target sequence
"""

from __future__ import annotations

import math

import numpy as np


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis, float64, same shape as `x` [..., vocab]."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class LogitsAccumulator:
    """`logits_metrics` over logits that arrive in chunks, with the memory of one chunk.

    `add(candidate, reference)` takes logits shaped [..., vocab] (any leading shape, the same
    for both); `result()` equals `logits_metrics` of all chunks concatenated (the per-position
    cosine, KL and top-k flags are kept, 3 floats per position, so the 1st percentile is exact).
    Raises ValueError if a chunk's shapes differ.
    """

    def __init__(self) -> None:
        self._cos: list[np.ndarray] = []
        self._kl: list[np.ndarray] = []
        self._top1: list[np.ndarray] = []
        self._top5: list[np.ndarray] = []
        self._max_abs = 0.0

    def add(self, candidate: np.ndarray, reference: np.ndarray) -> None:
        """Accumulate one chunk: both [..., vocab], the same shape (`ValueError` otherwise)."""
        c, r = _flat(candidate), _flat(reference)
        if c.shape != r.shape:
            raise ValueError(f"logit shapes differ: {c.shape} vs {r.shape}")
        self._cos.append(
            (c * r).sum(-1) / (np.linalg.norm(c, axis=-1) * np.linalg.norm(r, axis=-1) + 1e-30)
        )
        lc, lr = log_softmax(c), log_softmax(r)
        self._kl.append((np.exp(lr) * (lr - lc)).sum(-1))
        ref_top1 = r.argmax(-1)
        top5 = np.argpartition(-c, kth=min(4, c.shape[-1] - 1), axis=-1)[:, :5]
        self._top1.append(c.argmax(-1) == ref_top1)
        self._top5.append((top5 == ref_top1[:, None]).any(-1))
        self._max_abs = max(self._max_abs, float(np.abs(c - r).max()))

    def result(self) -> dict[str, float]:
        """{positions, cosine_mean, cosine_min, cosine_p01, max_abs (logit units), kl_mean,
        kl_max (nats), top1, top5 (fractions in [0, 1])} over every chunk added; `ValueError`
        when none was."""
        cos, kl = np.concatenate(self._cos), np.concatenate(self._kl)
        return {
            "positions": int(cos.shape[0]),
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "cosine_p01": float(np.percentile(cos, 1)),
            "max_abs": self._max_abs,
            "kl_mean": float(max(kl.mean(), 0.0)),
            "kl_max": float(max(kl.max(), 0.0)),
            "top1": float(np.concatenate(self._top1).mean()),
            "top5": float(np.concatenate(self._top5).mean()),
        }


def logits_metrics(candidate: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The metrics of the module docstring for logits shaped [..., vocab] (the same shape for
    both); raises ValueError if the shapes differ."""
    acc = LogitsAccumulator()
    acc.add(candidate, reference)
    return acc.result()


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token negative log-likelihood of `ids` [batch, seq] under `logits` [b, s, v]."""
    lp = log_softmax(np.asarray(logits)[:, :-1])
    picked = np.take_along_axis(lp, np.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    return float(-picked.mean())


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(`nll`): perplexity of `ids` [batch, seq] under `logits` [batch, seq, vocab]."""
    return math.exp(nll(logits, ids))


def merge(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine per-batch `logits_metrics` dicts, weighting means by positions (`cosine_p01`:
    the lowest part's, a conservative bound). `ZeroDivisionError` for no positions."""
    n = sum(p["positions"] for p in parts)
    out: dict[str, float] = {"positions": n}
    for key in ("cosine_mean", "kl_mean", "top1", "top5"):
        out[key] = sum(p[key] * p["positions"] for p in parts) / n
    out["cosine_min"] = min(p["cosine_min"] for p in parts)
    # A percentile does not merge exactly: the lowest part's is a conservative bound.
    out["cosine_p01"] = min(p.get("cosine_p01", p["cosine_min"]) for p in parts)
    out["max_abs"] = max(p["max_abs"] for p in parts)
    out["kl_max"] = max(p["kl_max"] for p in parts)
    return out
