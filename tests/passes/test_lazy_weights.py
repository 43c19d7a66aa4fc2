"""Passes never load weights they do not rewrite (the streaming issue, item 2).

On every family, with the weights in `model.onnx.data`, the default pipeline leaves every
weight on disk: the ones it keeps stay external tensors, the ones it derives (the [D, 2I]
gate/up concat, MLA's absorbed W_uk / W_uv, the MoE expert relayout) are lazy tensors computed
when the graph is written. Saved with external data, the optimized graph runs as the in-memory
pipeline's does (compare_ort against the export), and each derived weight's bytes equal the
straightforward computation from its sources.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from dsc.passes import run_pipeline
from dsc.passes._ir import read_consts
from dsc.passes.fusion._common import DerivedTensor
from tests.passes.conftest import FAMILIES, compare_ort, load, rtx_ctx

# What each family's fusions derive (initializer name stems), at least one of each.
DERIVED = {
    "llama": ("_gate_up",),
    "qwen2": ("_gate_up",),
    "deepseek_v2": ("_gate_up", "mla_w_uk_t", "mla_w_uv", "_moe_gu", "_moe_down"),
    "deepseek_v3": ("_gate_up", "mla_w_uk_t", "mla_w_uv", "_moe_gu", "_moe_down"),
}


def _external_copy(artifact, tmp_path) -> ir.Model:
    """The export with every initializer in model.onnx.data, loaded lazily."""
    model = load(artifact)
    ir.save(model, tmp_path / "in" / "model.onnx", external_data="model.onnx.data")
    return ir.load(tmp_path / "in" / "model.onnx")


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_holds_no_weight_in_memory(exported, family, tmp_path):
    (tmp_path / "in").mkdir()
    model = _external_copy(exported[family], tmp_path)
    originals = {n: v.const_value for n, v in model.graph.initializers.items()}
    run_pipeline(model, rtx_ctx())
    held, derived = [], []
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if isinstance(t, DerivedTensor):
            derived.append(name)
        elif not isinstance(t, ir.ExternalTensor) and t.nbytes > 4096:
            held.append((name, t.nbytes))
        elif isinstance(t, ir.ExternalTensor):
            assert t is originals.get(name), name  # kept as loaded, never re-read into memory
    assert not held, held[:5]
    for stem in DERIVED[family]:
        assert any(stem in n for n in derived), (stem, derived[:8])
    # Written with external data, the graph computes what the export does.
    (tmp_path / "out").mkdir()
    ir.save(model, tmp_path / "out" / "model.onnx", external_data="model.onnx.data")
    compare_ort(exported[family], tmp_path / "out" / "model.onnx", pad=2, padded_rows_free=True)


def test_derived_weights_equal_their_straightforward_computation(exported, tmp_path):
    """Every lazy weight of V3 (MLA + MoE + gate/up) against numpy on its sources."""
    (tmp_path / "in").mkdir()
    model = _external_copy(exported["deepseek_v3"], tmp_path)
    src = dict(model.graph.initializers)  # the sources, which the pipeline then drops
    run_pipeline(model, rtx_ctx())
    checked = 0
    for name, value in model.graph.initializers.items():
        t = value.const_value
        if not isinstance(t, DerivedTensor):
            continue
        got = t.numpy()
        assert got.shape == tuple(t.shape) and got.dtype == t.dtype.numpy()
        sources = read_consts(*(src[n] for n in t.sources))
        if "_gate_up" in name:  # [D, I] and [D, I] -> [D, 2I]
            want = np.concatenate(sources, -1)
        elif "_moe_gu" in name:  # [E, 2I, D] -> [E, D, 2I]
            want = sources[0].transpose(0, 2, 1)
        elif "_moe_down" in name:  # [E, D, I] -> [E*I, D]
            want = sources[0].transpose(0, 2, 1).reshape(got.shape)
        else:  # MLA's kv_b_proj [r, H*(N+V)] -> W_uk^T [H, N, r] and W_uv [H, r, V]
            assert "mla_w_u" in name, name
            h, r = got.shape[0], sources[0].shape[0]
            w = sources[0].reshape(r, h, -1)
            if "mla_w_uk_t" in name:
                want = w[:, :, : got.shape[1]].transpose(1, 2, 0)
            else:
                want = w[:, :, w.shape[2] - got.shape[2] :].transpose(1, 0, 2)
        np.testing.assert_array_equal(got, want, err_msg=name)
        checked += 1
    kinds = {
        k
        for k in ("_gate_up", "_moe_gu", "_moe_down", "mla_w_uk_t", "mla_w_uv")
        if any(
            k in n
            for n, v in model.graph.initializers.items()
            if isinstance(v.const_value, DerivedTensor)
        )
    }
    assert len(kinds) == 5 and checked >= 5, (kinds, checked)


@pytest.mark.parametrize(
    "model,precision",
    [("tiny-qwen2", "int8"), ("tiny-deepseek-v3", "int8"), ("tiny-deepseek-v3", "int4")],
)
def test_quantization_holds_no_weight_in_memory(model, precision, tmp_path, monkeypatch):
    """After SmoothQuant (INT8, with its α search) or AWQ (INT4), the Q/DQ insertion and
    layer-wise calibration, every weight over 4 KiB is still on disk or a DerivedTensor (the
    rescaled and quantized weights are computed when written), and writing them gives the
    graph ONNX Runtime runs: finite logits equal to those of the same quantization on a graph
    loaded whole into memory."""
    import json

    from dsc import api
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.quantize import quantize_model
    from tests.conftest import REPO

    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "cache"))
    art = tmp_path / "e"
    api.export(REPO / "examples/models" / model, art, dtype="fp16", external_data=True)
    io = json.loads((art / "model_io.json").read_text())
    tok = api.load_tokenizer(art)
    logits = {}
    for lazy in (True, False):
        m = ir.load(art / "model.onnx")
        if not lazy:
            ir.external_data.load_to_model(m)
        q, _, _ = quantize_model(
            m, io, tok, precision, samples=4, seq_len=32, use_cache=False, calibrate_by="layer"
        )
        if lazy:
            held = [
                (n, v.const_value.nbytes)
                for n, v in q.graph.initializers.items()
                if not isinstance(v.const_value, (ir.ExternalTensor, DerivedTensor))
                and v.const_value.nbytes > 4096
            ]
            assert not held, held[:5]
            assert any(
                isinstance(v.const_value, DerivedTensor) and n.endswith("_quantized")
                for n, v in q.graph.initializers.items()
            )
        out = tmp_path / ("lazy" if lazy else "whole")
        out.mkdir()
        ir.save(q, out / "model.onnx", external_data="model.onnx.data")
        lm = OrtCausalLM(out / "model.onnx", io)
        ids = np.array([[5, 17, 99, 3, 42, 7, 8, 1]], dtype=np.int64)
        logits[lazy] = lm.step(ids, np.ones_like(ids), np.arange(8)[None], lm.empty_past(1)).logits
    assert np.isfinite(logits[True]).all()
    np.testing.assert_array_equal(logits[True], logits[False])


def test_set_base_dir_follows_derived_sources(tmp_path):
    """A weight derived twice over (rescaled, then quantized) from an external tensor that is no
    longer in the graph still reads it after its data file moves: `set_base_dir` follows the
    DerivedTensor sources (the quantize stage moves its input into reference/ before writing)."""
    import shutil

    from dsc.passes._ir import derive_in_place, set_base_dir

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # over save's inline threshold
    v = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    graph = ir.Graph([], [], nodes=[], initializers=[v], opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    (tmp_path / "a").mkdir()
    ir.save(model, tmp_path / "a" / "m.onnx", external_data="m.onnx.data")
    loaded = ir.load(tmp_path / "a" / "m.onnx")
    src = loaded.graph.initializers["w"]
    assert isinstance(src.const_value, ir.ExternalTensor)
    derive_in_place(src, lambda a: a * 2)
    derive_in_place(src, lambda a: a + 1)
    out = ir.Value(name="w_out", const_value=src.const_value)
    loaded.graph.initializers.pop("w")
    loaded.graph.register_initializer(out)
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert set_base_dir(loaded, tmp_path / "b") == 1
    np.testing.assert_array_equal(out.const_value.numpy(), w * 2 + 1)
