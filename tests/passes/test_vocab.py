"""VocabQDQPass: lm_head and the embedding table stored quantized, weight-only.

Structural: op types after, `modified`, idempotence, a no-op. Numerical, on the session's fp32
exports: the dequantized weights equal a straightforward reference quantization (written out
here, not dsc's), the quantized graph equals in ONNX Runtime the float graph whose weights were
replaced by those dequantized values (atol 1e-4 on logits and every present, the pass tests'
fp32 tolerance), and, on the dense qwen2 fixture, its prefill logits stay within a stated
relative tolerance of the original float graph's (`FLOAT_RTOL`; on the random-weight MoE
fixture a rounded embedding flips expert choices, so only the exact comparison applies there).
Tied tables: one quantized table read by the Gather and the Transpose → MatMul; asked for at
two precisions, refused. Compile: the quantized graphs build with TensorRT-RTX for SM80
(int8/int4) and SM89 (fp8).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from dsc.errors import Unsupported
from dsc.passes.quant.vocab import VocabQDQPass, find_embedding, find_lm_head, quantize_table
from tests.passes.conftest import compare_ort, load, op_count, save

PRECISIONS = ("int8", "int4", "fp8")
# max |logits - float logits| / max |float logits|, prefill, random-weight qwen2 (hidden 64, so
# int4 has one block per row): measured 0.013 int8, 0.049 fp8, 0.23 int4 with both quantized;
# 0.0077 / 0.028 / 0.13 for lm_head alone.
FLOAT_RTOL = {"int8": 0.03, "fp8": 0.1, "int4": 0.35}


def prefill_rel_error(reference: Path, candidate: Path, io: dict) -> float:
    """max |candidate - reference| / max |reference| of the logits of one prefill (2 x 9)."""
    from dsc.backends.onnxruntime.runner import OrtCausalLM

    ids = np.random.default_rng(0).integers(0, io["vocab_size"], (2, 9))
    mask = np.ones_like(ids)
    out = []
    for path in (reference, candidate):
        lm = OrtCausalLM(path, io, threads=1)
        out.append(lm.step(ids, mask, np.cumsum(mask, 1) - 1, lm.empty_past(2)).logits)
    return float(np.abs(out[1] - out[0]).max() / np.abs(out[0]).max())


def reference_dequant_rows(table: np.ndarray, precision: str, block: int) -> np.ndarray:
    """Symmetric round-to-nearest quantization of each row (int4: each block of `block` values
    of a row), then dequantized: the textbook recipe, independent of dsc's code."""
    t = table.astype(np.float32)
    V, H = t.shape
    groups = t.reshape(V, H // block, block) if precision == "int4" else t.reshape(V, 1, H)
    # an all-zero row (the padding token's) gets a tiny positive scale, as every Q/DQ scale must
    amax = np.maximum(np.abs(groups).max(axis=2, keepdims=True), 1e-8)
    qmax = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[precision]
    scale = (amax / qmax).astype(t.dtype)
    if precision == "fp8":
        q = np.clip(groups / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        lo = -8 if precision == "int4" else -127
        q = np.clip(np.round(groups / scale), lo, qmax)
    return (q * scale).reshape(V, H)


def dequantize_node(node: ir.Node) -> np.ndarray:
    """DequantizeLinear of constants, evaluated with numpy (per-axis or blocked, zero point 0)."""
    q = node.inputs[0].const_value.numpy().astype(np.float32)
    s = node.inputs[1].const_value.numpy().astype(np.float32)
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    if block:
        return q * np.repeat(s, block, axis=axis)
    shape = [1] * q.ndim
    shape[axis] = -1
    return q * s.reshape(shape)


def _dq_of(value: ir.Value) -> ir.Node:
    p = value.producer()
    while p is not None and p.op_type == "Transpose":
        p = p.inputs[0].producer()
    assert p is not None and p.op_type == "DequantizeLinear", value.name
    return p


def _substituted(model: ir.Model) -> ir.Model:
    """The float graph the quantized one computes: each weight DQ replaced by its values."""
    for node in list(model.graph):
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            val = dequantize_node(node).astype(node.inputs[1].const_value.numpy().dtype)
            v = ir.Value(
                name=f"{node.outputs[0].name}_float",
                shape=ir.Shape(val.shape),
                type=ir.TensorType(ir.Tensor(val).dtype),
                const_value=ir.Tensor(val),
            )
            model.graph.register_initializer(v)
            node.outputs[0].replace_all_uses_with(v)
            model.graph.remove(node, safe=True)
    return model


def _artifact_with(src: Path, model: ir.Model, dst: Path) -> Path:
    """A copy of artifact `src`'s model_io.json beside `model` saved at dst/model.onnx."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "model_io.json", dst / "model_io.json")
    save(model, dst / "model.onnx")
    return dst


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantized_weights_and_outputs(exported, family, precision, tmp_path):
    art = exported[family]
    model = load(art)
    table = find_embedding(model).inputs[0].const_value.numpy().copy()
    w = find_lm_head(model)[1].const_value.numpy().copy()
    dq_before = op_count(model, "DequantizeLinear")
    p = VocabQDQPass(lm_head=precision, embedding=precision)
    assert p(model).modified
    assert op_count(model, "DequantizeLinear") == dq_before + 2
    gather = next(
        n
        for n in model.graph
        if n.op_type == "Gather"
        and n.inputs[0].producer() is not None
        and n.inputs[0].producer().op_type == "DequantizeLinear"
    )
    head = next(
        n
        for n in model.graph
        if n.op_type == "MatMul"
        and n.inputs[1].producer() is not None
        and n.inputs[1].producer().op_type == "DequantizeLinear"
    )
    block = 128 if table.shape[1] % 128 == 0 else table.shape[1]
    # the stored weights dequantize to the textbook quantization of each row / output channel
    np.testing.assert_allclose(
        dequantize_node(_dq_of(gather.inputs[0])),
        reference_dequant_rows(table, precision, block),
        rtol=0,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        dequantize_node(_dq_of(head.inputs[1])),
        reference_dequant_rows(w.T, precision, block).T,
        rtol=0,
        atol=1e-7,
    )
    assert not any(
        n in model.graph.initializers
        for n in (p.report["lm_head"]["weight"], p.report["embedding"]["weight"])
    )
    rec = p.report["embedding"]
    assert rec["precision"] == precision and rec["tied"] is False
    assert rec["block_size"] == (block if precision == "int4" else None)
    assert rec["bytes_after"] < rec["bytes_before"]
    quant = save(model, tmp_path / "q" / "model.onnx")
    # ONNX Runtime: exactly the float graph with the dequantized weights ...
    same = _artifact_with(art, _substituted(ir.load(quant)), tmp_path / "substituted")
    compare_ort(same, quant, decode=2)
    # ... and, dense model, close to the original float graph.
    if family == "qwen2":
        io = json.loads((art / "model_io.json").read_text())
        assert prefill_rel_error(art / "model.onnx", quant, io) <= FLOAT_RTOL[precision]
    # idempotent
    again = VocabQDQPass(lm_head=precision, embedding=precision)
    assert not again(model).modified
    assert again.report["not_found"] == ["lm_head", "embedding"]


def test_one_of_them_and_no_op(exported):
    model = load(exported["qwen2"])
    assert not VocabQDQPass()(model).modified  # nothing asked: no-op
    p = VocabQDQPass(lm_head="int4")
    assert p(model).modified
    assert "embedding" not in p.report and p.report["lm_head"]["block_size"] is not None
    assert find_embedding(model).inputs[0].const_value is not None  # the table stays float
    assert model.opset_imports[""] >= 21  # blocked DequantizeLinear
    p = VocabQDQPass(embedding="int8")
    assert p(model).modified and "lm_head" not in p.report
    with pytest.raises(ValueError, match="int3"):
        VocabQDQPass(lm_head="int3")


def _tie(model: ir.Model) -> ir.Model:
    """Rewire lm_head to Transpose(embedding table): the graph a tie_word_embeddings export has."""
    gather = find_embedding(model)
    head, w, _ = find_lm_head(model)
    t = ir.node("Transpose", [gather.inputs[0]], attributes={"perm": [1, 0]}, name="tied_t")
    t.outputs[0].name = "tied_w"
    t.outputs[0].dtype = w.dtype
    t.outputs[0].shape = w.shape
    model.graph.insert_before(head, t)
    head.replace_input_with(1, t.outputs[0])
    model.graph.initializers.pop(w.name)
    model.graph.sort()
    return model


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tied_table_quantized_once(exported, precision, tmp_path):
    art = exported["qwen2"]
    tied = _artifact_with(art, _tie(load(art)), tmp_path / "tied")
    model = load(tied)
    table = find_embedding(model).inputs[0].const_value.numpy().copy()
    p = VocabQDQPass(lm_head=precision, embedding=precision)
    assert p(model).modified
    assert p.report["lm_head"]["tied"] and p.report["lm_head"] == p.report["embedding"]
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 1
    readers = sorted(u.node.op_type for u in dqs[0].outputs[0].uses())
    assert readers == ["Gather", "Transpose"]
    np.testing.assert_allclose(
        dequantize_node(dqs[0]), reference_dequant_rows(table, precision, 64), rtol=0, atol=1e-7
    )
    quant = save(model, tmp_path / "q" / "model.onnx")
    io = json.loads((tied / "model_io.json").read_text())
    assert prefill_rel_error(tied / "model.onnx", quant, io) <= FLOAT_RTOL[precision]
    assert not VocabQDQPass(lm_head=precision, embedding=precision)(model).modified


@pytest.mark.parametrize("lm_head,embedding", [("int4", None), (None, "int8"), ("int4", "int8")])
def test_tied_table_at_two_precisions_refused(exported, lm_head, embedding, tmp_path):
    model = _tie(load(exported["qwen2"]))
    with pytest.raises(Unsupported, match="ties its embedding and lm_head"):
        VocabQDQPass(lm_head=lm_head, embedding=embedding)(model)


def test_quantize_table_layout():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((10, 256)).astype(np.float16)
    q, s, attrs = quantize_table(t, "int4", np.float16)
    assert q.shape == (10, 256) and s.shape == (10, 2) and attrs == {"axis": 1, "block_size": 128}
    q, s, attrs = quantize_table(t, "int8", np.float16)
    assert q.dtype == np.int8 and s.shape == (10,) and s.dtype == np.float16
    assert attrs == {"axis": 0}


def _rtx() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def fp16_qwen2(checkpoints, tmp_path_factory) -> Path:
    from dsc import api

    art = tmp_path_factory.mktemp("vocab") / "fp16"
    api.export(checkpoints["qwen2"], art, dtype="fp16", progress=lambda m: None)
    return art


@pytest.mark.rtx
@pytest.mark.skipif(not _rtx(), reason="tensorrt_rtx is not installed")
@pytest.mark.parametrize(
    "lm_head,embedding,sm", [("int4", "int8", 80), ("int8", "int4", 80), ("fp8", "fp8", 89)]
)
def test_engines_build(fp16_qwen2, lm_head, embedding, sm, tmp_path):
    """The quantized fp16 graph builds with TensorRT-RTX; fp8 is refused on SM80 (exit 4)."""
    from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, build_engine

    art = fp16_qwen2
    model = load(art)
    VocabQDQPass(lm_head=lm_head, embedding=embedding)(model)
    path = save(model, tmp_path / "q" / "model.onnx")
    io = json.loads((art / "model_io.json").read_text())
    env = ShapeEnvelope(1, 8, 32)
    r = build_engine(path, env, BuildOptions(target_sm=sm), backend="tensorrt_rtx", io_spec=io)
    assert r.size_bytes > 0
    if sm == 89:
        with pytest.raises(Unsupported, match="fp8"):
            build_engine(path, env, BuildOptions(target_sm=80), backend="tensorrt_rtx", io_spec=io)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("table", [True, False], ids=["table", "lm_head"])
def test_row_chunks_equal_the_whole_table(precision, table, tmp_path, monkeypatch):
    """`quantize_rows` on an external tensor in many row chunks (a partial last one included):
    the scales and quantized weight equal `quantize_table` / `quantize_weight` of the whole
    array bit for bit, the bytes written chunk by chunk equal the whole tensor's, and the
    source is only ever read in chunks of at most the chunk size (never memory-mapped whole)."""
    from dsc.passes.quant import vocab
    from dsc.passes.quant.qdq import QuantScheme, quantize_weight

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((300, 384)) * 0.05).astype(np.float16)
    w[7] = 0  # a dead row / column part: the floor, never a zero scale
    w[:, 5] = 0
    (tmp_path / "w.data").write_bytes(b"\0" * 64 + w.tobytes())
    src = ir.ExternalTensor(
        "w.data",
        offset=64,
        length=w.nbytes,
        dtype=ir.DataType.FLOAT16,
        shape=ir.Shape(list(w.shape)),
        name="w",
        base_dir=tmp_path,
    )
    monkeypatch.setattr(vocab, "CHUNK_BYTES", 384 * 4 * 50)  # 50 rows of 384 float32 (table)
    largest = []
    real_iter = vocab.iter_rows

    def spy(tensor, rows):
        for r0, chunk in real_iter(tensor, rows):
            largest.append(chunk.nbytes)
            yield r0, chunk

    monkeypatch.setattr(vocab, "iter_rows", spy)
    monkeypatch.setattr(
        ir.ExternalTensor, "numpy", lambda self: pytest.fail("the whole table was read")
    )
    q, scale, attrs = vocab.quantize_rows(src, precision, table=table)
    if table:
        q_ref, s_ref, a_ref = quantize_table(w, precision, np.float16)
    else:
        q_ref, s_ref, a_ref = quantize_weight(
            w, QuantScheme(precision, True), scale_dtype=np.float16
        )
    assert attrs == a_ref and scale.dtype == s_ref.dtype and scale.shape == s_ref.shape
    assert scale.tobytes() == s_ref.tobytes()
    got = q.numpy()
    assert got.dtype == q_ref.dtype and got.shape == q_ref.shape
    assert got.view(np.uint8).tobytes() == np.asarray(q_ref).view(np.uint8).tobytes()
    with open(tmp_path / "chunked.bin", "wb") as f:
        q.tofile(f)
    with open(tmp_path / "whole.bin", "wb") as f:
        ir.Tensor(q_ref).tofile(f)
    assert (tmp_path / "chunked.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()
    # three reads (scales, numpy, tofile) of at least 3 chunks each; none over 100 float16 rows
    # (50 rows; lm_head int4: 100, one whole block of its 300 = 3 x 100 input rows)
    assert len(largest) >= 9
    assert max(largest) <= 100 * 384 * 2
