"""Gate metrics and the divergence rule against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsc.errors import BadInput
from dsc.validate import metrics
from dsc.validate.gate import parse_thresholds, resolve_thresholds
from dsc.validate.locate import TensorError, first_jump


def test_logits_metrics_by_hand():
    ref = np.array([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    cand = np.array([[1.0, 2.0, 0.0, -1.0, -2.0, -3.0]])  # top-1 swapped, still in top-5
    m = metrics.logits_metrics(cand, ref)
    p = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
    q = np.exp(cand - cand.max()) / np.exp(cand - cand.max()).sum()
    assert m["kl_mean"] == pytest.approx(float((p * np.log(p / q)).sum()))
    assert m["cosine_min"] == pytest.approx(float((ref @ cand.T)[0, 0]) / np.linalg.norm(ref) ** 2)
    assert m["top1"] == 0.0 and m["top5"] == 1.0
    assert m["max_abs"] == 1.0
    same = metrics.logits_metrics(ref, ref)
    assert (
        same["kl_mean"] == 0.0 and same["top1"] == 1.0 and same["cosine_min"] == pytest.approx(1.0)
    )


def test_perplexity_of_uniform_logits_is_vocab_size():
    ids = np.array([[0, 1, 2, 3]])
    assert metrics.perplexity(np.zeros((1, 4, 7)), ids) == pytest.approx(7.0)
    logits = np.full((1, 4, 7), -50.0)
    logits[0, np.arange(3), ids[0, 1:]] = 50.0  # certain of every next token
    assert metrics.nll(logits, ids) == pytest.approx(0.0, abs=1e-9)


def test_merge_weights_by_positions():
    a = {
        "positions": 1,
        "cosine_mean": 1.0,
        "kl_mean": 0.0,
        "top1": 1.0,
        "top5": 1.0,
        "cosine_min": 1.0,
        "max_abs": 0.0,
        "kl_max": 0.0,
    }
    b = dict(a, positions=3, top1=0.0, max_abs=2.0)
    m = metrics.merge([a, b])
    assert m["positions"] == 4 and m["top1"] == 0.25 and m["max_abs"] == 2.0


def _errs(*pairs):
    return [TensorError(f"t{i}", mod, None, err) for i, (mod, err) in enumerate(pairs)]


def test_first_jump_names_the_break_not_noise():
    errs = _errs(("a", 0.001), ("b", 0.004), ("c", 0.006), ("d", 0.9), ("e", 1.2))
    assert first_jump(errs).module == "d"
    assert first_jump(_errs(("a", 0.001), ("b", 0.004))) is None  # below the floor


def test_first_jump_ignores_routed_expert_flips():
    errs = _errs(
        ("l.1.mlp.gate", 0.01),
        ("l.1.mlp.experts", 0.21),
        ("l.1.mlp", 0.15),
        ("l.1.mlp.shared_experts", 0.012),
        ("l.2.self_attn.q_a_proj", 9.0),
    )
    assert first_jump(errs).module == "l.2.self_attn.q_a_proj"


def test_thresholds():
    th = resolve_thresholds("int8", parse_thresholds(["max_ppl_delta=0.05,min_top1=0.5"]))
    assert th["max_ppl_delta"] == 0.05 and th["min_top1"] == 0.5
    assert th["min_cosine"] == resolve_thresholds("int8")["min_cosine"]
    for bad in (["nokey"], ["max_kl=abc"]):
        with pytest.raises(BadInput):
            parse_thresholds(bad)
    with pytest.raises(BadInput, match="unknown threshold"):
        resolve_thresholds("fp16", {"max_banana": 1})
    with pytest.raises(BadInput):
        resolve_thresholds("int3")
    assert math.isclose(resolve_thresholds("fp8")["max_ppl_delta"], 0.01)


def test_cosine_p01_ignores_one_position_but_not_a_broken_graph():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1000, 32))
    cand = ref + 1e-3 * rng.normal(size=ref.shape)
    one = cand.copy()
    one[7] = rng.normal(size=32)  # one unrelated position out of 1000
    m = metrics.logits_metrics(one, ref)
    assert m["cosine_min"] < 0.7 and m["cosine_p01"] > 0.999
    many = cand.copy()
    many[::40] = rng.normal(size=(25, 32))  # 2.5% of the positions
    m = metrics.logits_metrics(many, ref)
    assert m["cosine_p01"] < 0.7
    lo, hi = (
        metrics.logits_metrics(cand[:500], ref[:500]),
        metrics.logits_metrics(one[500:], ref[500:]),
    )
    merged = metrics.merge([lo, hi])
    assert merged["cosine_p01"] == min(lo["cosine_p01"], hi["cosine_p01"])


def test_gate_failure_prints_a_value_apart_from_its_threshold():
    from dsc.validate.gate import _apart

    assert _apart(0.9, 0.97) == "0.9"
    assert _apart(0.999986, 0.99999) == "0.999986"  # not "1 < 0.99999"
    assert _apart(0.96999, 0.97) == "0.96999"  # not "0.97 < 0.97"
    assert _apart(0.0123456, 0.01) == "0.01235"
