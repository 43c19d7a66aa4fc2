"""SmoothQuant / AWQ algorithms: exact scale folding (ONNX Runtime before/after), AWQ clip and
scale searches against round-to-nearest on calibration rows, the SmoothQuant guard and α search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.passes.quant.awq import CLIP_GRID, AWQScalePass, search_clip, search_scale
from dsc.passes.quant.fold import find_fold
from dsc.passes.quant.qdq import (
    InsertQDQPass,
    QuantScheme,
    dequantize_weight,
    find_targets,
    quantize_weight,
)
from dsc.passes.quant.smoothquant import SmoothQuantPass, apply_scales, smoothable_groups
from tests.passes.conftest import CLEANUP, _steps, io_spec, load, rtx_ctx, run, save

INT4 = QuantScheme("int4", weight_only=True)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """fp32 exports of the trained tiny models (trained norm gammas and biases: the random
    fixtures' all-ones gammas are folded away by the exporter), made lazily per model."""
    from dsc import api

    root = tmp_path_factory.mktemp("trained")

    class _Lazy(dict):
        def __missing__(self, name):
            out = root / name
            api.export(
                REPO / "examples" / "models" / name, out, dtype="fp32", progress=lambda m: None
            )
            self[name] = out
            return out

    return _Lazy()


def _logits(path, io) -> list[np.ndarray]:
    """Logits of a prefill and 3 decode steps (each graph feeds its own cache back)."""
    lm = OrtCausalLM(path, io, threads=1)
    return [o.logits for o, _, _ in _steps(lm, io, 2, 9, 3, 0, 0)]


def _scale_everything(model: ir.Model, seed: int = 0) -> tuple[dict, dict]:
    """Fold random scales in [1/2, 2] into every smoothable group (tied where required)."""
    groups, skipped = smoothable_groups(model)
    rng = np.random.default_rng(seed)
    for fold, ts in groups.values():
        s = np.exp(rng.uniform(-0.7, 0.7, fold.cols.size)).astype(np.float32)
        apply_scales(fold, ts, fold.tie(s, "mean"))
    return groups, skipped


def _invariant(artifact, model: ir.Model, tmp_path, seed: int = 0) -> tuple[dict, dict]:
    before = save(model, tmp_path / "before.onnx")
    groups, skipped = _scale_everything(model, seed)
    after = save(model, tmp_path / "after.onnx")
    io = io_spec(artifact)
    for step, (a, b) in enumerate(zip(_logits(before, io), _logits(after, io), strict=False)):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=f"step {step}")
    return groups, skipped


def _kinds(groups: dict) -> dict[str, str]:
    """{module of the first reader: fold target} for every group."""
    return {ts[0].module.split("layers.", 1)[-1]: fold.where for fold, ts in groups.values()}


def test_folds_exported_qwen2_gqa(trained, tmp_path):
    """norm gamma, up_proj columns (down_proj), v_proj columns tied per KV head (o_proj, GQA)."""
    art = trained["tiny-qwen2"]
    groups, skipped = _invariant(art, load(art), tmp_path)
    kinds = _kinds(groups)
    assert kinds["0.self_attn.q_proj"].endswith("input_layernorm.weight")
    assert kinds["0.mlp.gate_proj"].endswith("post_attention_layernorm.weight")
    assert kinds["0.mlp.down_proj"].endswith("mlp.up_proj")
    assert kinds["0.self_attn.o_proj"].endswith("self_attn.v_proj")
    fold = next(f for f, ts in groups.values() if ts[0].module.endswith("0.self_attn.o_proj"))
    # 4 query heads over 2 KV heads: o channel (h, d) <- v channel (h // 2, d), bias included
    d = fold.cols.size // 4
    assert fold.tensor.const_value.shape[1] == 2 * d
    want = np.concatenate([np.arange(d) + (h // 2) * d for h in range(4)])
    np.testing.assert_array_equal(fold.cols, want)
    assert fold.tied and fold.bias is not None and fold.cache
    assert "read by an excluded layer" in skipped.values()  # lm_head's input


def test_folds_exported_deepseek_v3_mla(trained, tmp_path):
    """MLA: o_proj into kv_b_proj's value columns; kv_b_proj into kv_a_layernorm through the
    compressed-KV cache; MoE inputs (router + experts) skipped with a reason."""
    art = trained["tiny-deepseek-v3"]
    groups, skipped = _invariant(art, load(art), tmp_path)
    kinds = _kinds(groups)
    assert kinds["0.self_attn.o_proj"].endswith("self_attn.kv_b_proj")
    assert kinds["0.self_attn.kv_b_proj"].endswith("kv_a_layernorm.weight")
    assert kinds["1.mlp.shared_experts.down_proj"].endswith("shared_experts.up_proj")
    fold = next(f for f, ts in groups.values() if ts[0].module.endswith("0.self_attn.o_proj"))
    # kv_b_proj columns per head: [k_nope 32 | v 32]; o_proj channel (h, d) <- h * 64 + 32 + d
    want = np.concatenate([h * 64 + 32 + np.arange(32) for h in range(4)])
    np.testing.assert_array_equal(fold.cols, want)
    assert not fold.tied
    assert any("router" in r for r in skipped.values())


def test_folds_fused_rmsnorm_and_gate_up(trained, tmp_path):
    """After fuse-rmsnorm + fuse-mlp: RMSNormalization's scale and the up half of the fused
    [D, 2I] gate_up weight (read through its Split) take 1/s."""
    art = trained["tiny-qwen2"]
    model = load(art)
    run(model, [*CLEANUP, "fuse-rmsnorm", "fuse-mlp"], rtx_ctx())
    assert any(n.op_type == "RMSNormalization" for n in model.graph)
    groups, _ = _invariant(art, model, tmp_path, seed=1)
    folds = [f for f, _ in groups.values()]
    norm = [f for f in folds if f.tensor.producer() is None and f.kind == "norm"]
    assert norm and all(
        any(u.op_type == "RMSNormalization" for u, _ in f.tensor.uses()) for f in norm
    )
    gate_up = [f for f in folds if f.kind == "linear" and "Split" in f.via]
    assert gate_up
    for f in gate_up:  # the up half: columns I..2I of the [D, 2I] weight
        i = f.tensor.const_value.shape[1] // 2
        np.testing.assert_array_equal(f.cols, np.arange(i, 2 * i))


def test_fold_refuses_shared_values():
    """A value read by anything besides the next op on the way has no exact fold."""
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(
        name="w",
        shape=ir.Shape([4, 4]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.Tensor(np.eye(4, dtype=np.float32), name="w"),
    )
    mm = ir.node("MatMul", [x, w])
    mm.outputs[0].shape, mm.outputs[0].dtype = ir.Shape([2, 4]), ir.DataType.FLOAT
    act = ir.node("Mul", [mm.outputs[0], mm.outputs[0]])
    act.outputs[0].shape, act.outputs[0].dtype = ir.Shape([2, 4]), ir.DataType.FLOAT
    ir.Graph([x], [act.outputs[0]], nodes=[mm, act], initializers=[w])
    fold, why = find_fold(act.outputs[0])
    assert fold is None and "also read by" in why


@pytest.fixture(scope="module")
def v3_stats(exported):
    from dsc.passes.quant import calibrate as cal

    model = load(exported["deepseek_v3"])
    rng = np.random.default_rng(0)
    windows = rng.integers(3, io_spec(exported["deepseek_v3"])["vocab_size"], (8, 32))
    return cal.collect(model, io_spec(exported["deepseek_v3"]), windows, use_cache=False)


def _row_error(x, w, wq) -> float:
    return float(np.mean((x @ (w.astype(np.float32) - wq)) ** 2))


def test_clip_search_never_worse_than_rtn():
    """Clip ratios lower (never raise) the calibration-row error, and `quantize_weight(clip=)`
    reproduces the error the search reports."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 384)).astype(np.float32)
    x[:, :4] *= 20  # outlier channels
    w = (rng.standard_normal((384, 96)) * 0.05).astype(np.float32)
    w[rng.integers(0, 384, 30), rng.integers(0, 96, 30)] *= 8  # outlier weights
    ratios, err, err0 = search_clip(x, w, INT4)
    assert ratios.shape == (3, 96) and (ratios <= 1).all() and (ratios >= 0.5).all()
    assert err < err0 and (ratios < 1).any()
    q, s, attrs = quantize_weight(w, INT4, ratios)
    assert err == pytest.approx(_row_error(x, w, dequantize_weight(q, s, attrs)), rel=1e-3)
    q0, s0, a0 = quantize_weight(w, INT4)
    assert err0 == pytest.approx(_row_error(x, w, dequantize_weight(q0, s0, a0)), rel=1e-3)
    # quantized levels stay in INT4's [-8, 7]; -8 is reachable with clipping
    assert q.astype(np.int8).min() >= -8 and q.astype(np.int8).max() <= 7


def _clip_by_residual(x, w, grid, sweeps=2, b=128):
    """The clip search written directly: score each candidate on the whole [n, out] residual."""
    nb, n_out = w.shape[0] // b, w.shape[1]
    wg = w.reshape(nb, b, n_out)
    amax = np.abs(wg).max(axis=1)

    def delta(g, r):
        sc = np.maximum(amax[g] * r, 1e-8) / 7
        return wg[g] - np.clip(np.round(wg[g] / sc), -8, 7) * sc

    ratios = np.ones((nb, n_out), np.float32)
    d = [delta(g, 1.0) for g in range(nb)]
    xs = [x[:, g * b : (g + 1) * b] for g in range(nb)]
    res = sum(xs[g] @ d[g] for g in range(nb))
    for _ in range(sweeps):
        for g in range(nb):
            base = res - xs[g] @ d[g]
            best = np.sum((base + xs[g] @ d[g]).astype(np.float64) ** 2, axis=0)
            for r in grid:
                dr = delta(g, r)
                e = np.sum((base + xs[g] @ dr).astype(np.float64) ** 2, axis=0)
                better = e < best
                best = np.where(better, e, best)
                d[g][:, better] = dr[:, better]
                ratios[g, better] = r
            res = base + xs[g] @ d[g]
    return ratios, float(np.sum(res.astype(np.float64) ** 2)) / res.size


def test_clip_search_gram_form_equals_residual_scoring():
    """The Gram-form search (8× fewer flops at 1,024 rows) picks the ratios that scoring every
    candidate on the whole output residual picks, and reports the same error."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 640)).astype(np.float32)
    x[:, rng.integers(0, 640, 6)] *= 25
    w = (rng.standard_normal((640, 200)) * 0.03).astype(np.float32)
    w[rng.integers(0, 640, 80), rng.integers(0, 200, 80)] *= 10
    ratios, err, _ = search_clip(x, w, INT4)
    ref, ref_err = _clip_by_residual(x, w, CLIP_GRID)
    assert (ratios < 1).mean() > 0.5
    assert np.mean(ratios == ref) >= 0.999, np.mean(ratios == ref)
    assert err == pytest.approx(ref_err, rel=1e-5)


def test_awq_pass_error_not_above_rtn(exported, v3_stats):
    """Per layer, on the calibration rows: AWQ (scales + clipping, as InsertQDQPass stores the
    weights) has no more output error than round-to-nearest of the original weights."""
    model = load(exported["deepseek_v3"])
    orig = {
        t.weight.name: t.weight.const_value.numpy().astype(np.float32)
        for t in find_targets(model)
        if not t.excluded and t.kind == "linear"
    }
    aw = AWQScalePass(v3_stats)
    aw(model)
    assert aw.clip and aw.report["clipped"] and aw.scales
    assert any(v["fold"]["kind"] == "linear" for v in aw.report["scaled"].values())
    checked = 0
    for t in find_targets(model):
        if t.weight.name not in orig:
            continue
        x = v3_stats.acts[t.activation.name].rows.astype(np.float32)
        w0 = orig[t.weight.name]
        q, s, a = quantize_weight(w0, INT4)
        rtn = float(np.mean((x @ (dequantize_weight(q, s, a) - w0)) ** 2))
        s_in = aw.scales.get(t.activation.name, np.ones(w0.shape[0], np.float32))
        w = t.weight.const_value.numpy().astype(np.float32)
        # a later fold may have divided this weight's output columns too (up_proj, v_proj)
        ref = s_in[:, None] * w0
        big = np.abs(ref) > 1e-3 * np.abs(ref).max()
        col = np.array([np.median(ref[big[:, c], c] / w[big[:, c], c]) for c in range(w.shape[1])])
        q, s, a = quantize_weight(w, INT4, aw.clip.get(t.weight.name))
        y = (x / s_in) @ (dequantize_weight(q, s, a) * col)
        got = float(np.mean((y - x @ w0) ** 2))
        assert got <= rtn * (1 + 1e-3), (t.module, got, rtn)
        checked += 1
    assert checked >= 10


def test_search_scale_not_above_alpha_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 128)).astype(np.float32) * np.linspace(0.1, 8, 128)
    ws = [rng.standard_normal((128, 64)).astype(np.float32) * 0.05 for _ in range(2)]
    s, alpha, err, err0 = search_scale(x, np.abs(x).mean(0), ws, INT4)
    assert err <= err0 and alpha > 0 and s.shape == (128,)


def test_smoothquant_guard_and_alpha_search(exported, v3_stats):
    """Every smoothed group lowers the calibration-row W8A8 GEMM error; α=None picks per layer."""
    fixed = SmoothQuantPass(v3_stats, 0.5)
    fixed(load(exported["deepseek_v3"]))
    assert any("gated product" in r for r in fixed.report["skipped"].values())  # down_proj
    auto = SmoothQuantPass(v3_stats, None, gated=True)
    auto(load(exported["deepseek_v3"]))
    assert any(v["fold"]["via"][-1:] == ["Mul"] for v in auto.report["smoothed"].values())
    for rep in (fixed.report, auto.report):
        assert rep["smoothed"]
        for v in rep["smoothed"].values():
            assert v["mse"] < v["mse_unsmoothed"]
    assert auto.report["alpha"] == "per layer"
    assert {v["alpha"] for v in auto.report["smoothed"].values()} <= set(auto.grid)
    # the search includes 0.5: it never ends above the fixed α on a group both smoothed
    for k, v in fixed.report["smoothed"].items():
        if k in auto.report["smoothed"]:
            assert auto.report["smoothed"][k]["mse"] <= v["mse"] * (1 + 1e-6)
    with pytest.raises(ValueError):
        SmoothQuantPass({"x": np.ones(4)}, None)


def test_insert_qdq_clip_argument(exported):
    """`InsertQDQPass(clip=...)` scales the named weight's INT4 blocks; others are unchanged."""
    model = load(exported["llama"])
    t = next(t for t in find_targets(model) if not t.excluded and t.kind == "linear")
    w = t.weight.const_value.numpy()
    nb = w.shape[0] // min(128, w.shape[0])
    clip = np.full((nb, w.shape[1]), 0.875, np.float32)
    InsertQDQPass(None, INT4, clip={t.weight.name: clip})(model)
    scale = model.graph.initializers[f"{t.weight.name}_scale"].const_value.numpy()
    _, s_ref, _ = quantize_weight(w, INT4, clip)
    np.testing.assert_allclose(scale, s_ref.astype(scale.dtype))
    plain = load(exported["llama"])
    InsertQDQPass(None, INT4)(plain)
    s_plain = plain.graph.initializers[f"{t.weight.name}_scale"].const_value.numpy()
    np.testing.assert_allclose(scale, s_plain * 0.875, rtol=1e-5)


def test_gemm_error_blocks_equal_whole_weight():
    """`gemm_error` works per block of output columns; per-channel scales make that exact:
    the result equals the W8A8 GEMM error computed on the whole weights at once."""
    from dsc.passes.quant import smoothquant
    from dsc.passes.quant.smoothquant import _fake_int8, gemm_error

    rng = np.random.default_rng(1)
    rows = rng.normal(size=(64, 96)).astype(np.float32) * rng.uniform(0.1, 8, 96)
    weights = [rng.normal(size=(96, n)).astype(np.float16) for n in (1300, 7)]
    absmax = np.abs(rows).max(0)
    s = rng.uniform(0.5, 2.0, 96).astype(np.float32)
    whole = 0.0
    xs = _fake_int8(rows / s, float((absmax / s).max()))
    for w in weights:
        q, sc, attrs = quantize_weight(w.astype(np.float32) * s[:, None], QuantScheme("int8"))
        whole += float(
            np.mean(
                (
                    xs.astype(np.float64) @ dequantize_weight(q, sc, attrs)
                    - rows.astype(np.float64) @ w.astype(np.float64)
                )
                ** 2
            )
        )
    assert smoothquant.GEMM_ERROR_COLUMNS < 1300
    refs = [rows @ w.astype(np.float32) for w in weights]
    for r in (None, refs):
        assert gemm_error(rows, absmax, weights, s, r) == pytest.approx(whole, rel=1e-5)
