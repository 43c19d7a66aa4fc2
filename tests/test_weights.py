"""The per-tensor weight reader: FP8 block dequantization, MTP skipping, checks, and loading.

The dequantization reference is written independently of `dsc.models.weights`: it decodes the
float8_e4m3fn bit patterns itself (numpy, no torch float8 arithmetic) and walks the scale grid
block by block.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsc.errors import CheckpointError
from dsc.fixtures import quantize_fp8_blocks, read_tensors, to_fp8_published, write_sharded
from dsc.models.checkpoint import inspect_checkpoint
from dsc.models.weights import WeightReader, dequantize_fp8_blocks

from .conftest import FAMILIES


def decode_e4m3fn(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns (uint8) → float64: bias 7, no infinities, S.1111.111 is NaN."""
    b = bits.astype(np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * np.exp2(-6.0)
    value = sign * np.where(exp == 0, subnormal, normal)
    return np.where((exp == 15) & (man == 7), np.nan, value)


def reference_dequantize(
    weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)
) -> np.ndarray:
    """The straightforward loop: each block times its own scale, in float32."""
    w = decode_e4m3fn(weight_fp8.view(torch.uint8).numpy()).astype(np.float32)
    s = scale_inv.numpy().astype(np.float32)
    out = np.empty_like(w)
    rows, cols = w.shape
    for i, r0 in enumerate(range(0, rows, block[0])):
        for j, c0 in enumerate(range(0, cols, block[1])):
            out[r0 : r0 + block[0], c0 : c0 + block[1]] = (
                w[r0 : r0 + block[0], c0 : c0 + block[1]] * s[i, j]
            )
    return out


def test_e4m3_decoder_agrees_with_torch_on_all_finite_codes():
    """Guard for the reference itself: every finite code decodes like torch's float8 cast."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ours = decode_e4m3fn(codes.numpy())
    theirs = codes.view(torch.float8_e4m3fn).float().numpy()
    finite = ~np.isnan(ours)
    assert finite.sum() == 254
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    assert np.isnan(theirs[~finite]).all()


@pytest.mark.parametrize(
    "shape,block",
    [
        ((576, 64), (128, 128)),  # kv_a_proj_with_mqa: 5 row blocks, the last 64 rows; column edge
        ((300, 260), (128, 128)),  # partial blocks on both axes
        ((256, 384), (128, 128)),  # whole blocks only
        ((100, 70), (32, 16)),  # another block size
    ],
)
def test_dequantize_matches_reference_loop(shape, block):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g)
    # Blocks of very different magnitude, so a scale applied to the wrong block shows.
    w *= torch.exp2(torch.randint(-6, 6, (shape[0], 1), generator=g).float())
    q, scale = quantize_fp8_blocks(w, block)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    assert tuple(scale.shape) == grid
    got = dequantize_fp8_blocks(q, scale, block)
    assert got.dtype == torch.float32
    want = reference_dequantize(q, scale, block)
    np.testing.assert_array_equal(got.numpy(), want)
    # and the fixture's quantization is a faithful one (relative to each block's amax)
    assert float((got - w).abs().max()) <= float(w.abs().max()) / 8


def test_dequantize_refuses_a_scale_grid_of_the_wrong_shape():
    q, scale = quantize_fp8_blocks(torch.randn(576, 64))
    with pytest.raises(CheckpointError, match=r"needs \[5, 1\]"):
        dequantize_fp8_blocks(q, scale[:4], (128, 128), name="w")


def test_reader_folds_scales_and_skips_the_mtp_layer(fp8_checkpoint):
    info = inspect_checkpoint(fp8_checkpoint)
    assert info.quantization is not None and info.quantization.block == (128, 128)
    raw = read_tensors(fp8_checkpoint)
    with WeightReader.for_checkpoint(info, dtype=torch.float32) as reader:
        names = set(reader.names)
        assert not any(n.endswith("_scale_inv") for n in names)
        layer = info.config["num_hidden_layers"]
        mtp = f"model.layers.{layer}."
        assert reader.skipped and all(n.startswith(mtp) for n in reader.skipped)
        assert not any(n.startswith(mtp) for n in names)
        scales = {n for n in raw if n.endswith("_scale_inv")}
        assert names | set(reader.skipped) | scales == set(raw)
        kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
        assert raw[kv].dtype == torch.float8_e4m3fn and tuple(raw[kv].shape) == (576, 64)
        assert tuple(raw[kv + "_scale_inv"].shape) == (5, 1)
        got = reader.read(kv)
        np.testing.assert_array_equal(
            got.numpy(), reference_dequantize(raw[kv], raw[kv + "_scale_inv"])
        )
        expert = "model.layers.1.mlp.experts.3.down_proj.weight"
        np.testing.assert_array_equal(
            reader.read(expert).numpy(),
            reference_dequantize(raw[expert], raw[expert + "_scale_inv"]),
        )
        # Unquantized tensors come back as stored, or cast on request.
        norm = "model.layers.0.input_layernorm.weight"
        assert reader.read(norm).dtype == torch.bfloat16
        assert torch.equal(reader.read(norm, torch.float32), raw[norm].float())
        streamed = dict(iter(reader))
        assert set(streamed) == names
        assert all(t.dtype == torch.float32 for t in streamed.values() if t.is_floating_point())


def _rewrite(ckpt, name, fn):
    """Apply `fn` to tensor `name` in whichever shard holds it."""
    for f in ckpt.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            tensors[name] = fn(tensors[name])
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise KeyError(name)


@pytest.mark.parametrize(
    "name,what",
    [
        ("model.layers.1.post_attention_layernorm.weight", "NaN"),
        ("model.layers.0.self_attn.o_proj.weight_scale_inv", "Inf"),
        ("model.layers.2.mlp.experts.5.up_proj.weight", "NaN"),  # an FP8 NaN code (0x7F)
    ],
)
def test_reader_names_non_finite_tensors(tmp_path, fp8_checkpoint, name, what):
    ckpt = shutil.copytree(fp8_checkpoint, tmp_path / "ckpt")

    def poison(t):
        t = t.clone()
        if t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).view(-1)[7] = 0x7F
        else:
            t.view(-1)[0] = float("nan") if what == "NaN" else float("inf")
        return t

    _rewrite(ckpt, name, poison)
    with (
        WeightReader.for_checkpoint(inspect_checkpoint(ckpt)) as reader,
        pytest.raises(CheckpointError, match=rf"{name} .*holds {what}"),
    ):
        dict(iter(reader))


def test_reader_refuses_an_fp16_cast_that_overflows(tmp_path, checkpoints):
    ckpt = write_sharded(checkpoints["llama"], tmp_path / "ckpt")
    name = "model.norm.weight"
    _rewrite(ckpt, name, lambda t: t * 0 + 70000.0)
    info = inspect_checkpoint(ckpt)
    with WeightReader.for_checkpoint(info, dtype=torch.bfloat16) as reader:
        dict(iter(reader))  # fits bf16
    overflow = rf"{name} holds values up to 7[.0-9]*e\+04.*--dtype bf16"
    with (
        WeightReader.for_checkpoint(info, dtype=torch.float16) as reader,
        pytest.raises(CheckpointError, match=overflow),
    ):
        dict(iter(reader))


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_load_equals_transformers_own_load(family, checkpoints, tmp_path):
    """The reader + transformers' key conversion loads exactly what from_pretrained(path) does,
    including the per-expert tensors fused into 3-D gate_up_proj / down_proj."""
    from transformers import AutoModelForCausalLM

    from dsc.export.onnx_export import load_model

    ckpt = write_sharded(checkpoints[family], tmp_path / "ckpt", shards=3)
    want = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    got = load_model(inspect_checkpoint(ckpt), "fp32").state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
    if family.startswith("deepseek"):
        assert any(k.endswith("mlp.experts.gate_up_proj") and got[k].ndim == 3 for k in got)


def test_fp8_layout_round_trip_keeps_unquantized_tensors(tmp_path, checkpoints):
    """to_fp8_published leaves embeddings, norms, lm_head and the router unquantized."""
    ckpt = to_fp8_published(checkpoints["deepseek_v3"], tmp_path / "fp8", mtp=False)
    raw = read_tensors(ckpt)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.mlp.gate.weight",
    ):
        assert raw[name].dtype == torch.bfloat16, name
    assert raw["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert raw["model.layers.1.mlp.shared_experts.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert not any(n.startswith("model.layers.3.") for n in raw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transpose", [False, True])
def test_read_into_in_row_chunks_equals_a_whole_read(tmp_path, dtype, transpose):
    """Chunked reads (a chunk of 3 rows, the last one short), cast to each dtype, transposed or
    not: the same values as reading the tensor whole, then casting and transposing it. Two
    tensors in turn through one reader (its chunk buffer is reused), the second one wider."""
    tensors = {
        "w": torch.randn(11, 7, dtype=torch.float32).to(torch.bfloat16),
        "v": torch.randn(5, 9, dtype=torch.float32).to(torch.bfloat16),
    }
    (tmp_path / "ckpt").mkdir()
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors")
    with WeightReader([tmp_path / "ckpt" / "model.safetensors"], dtype=dtype) as reader:
        for name, w in tensors.items():
            want = reader.read(name, dtype)
            want = want.T.contiguous() if transpose else want
            out = torch.empty(want.shape, dtype=dtype)
            reader.read_into(name, out, transpose=transpose, chunk_bytes=3 * 7 * 2)
            assert torch.equal(out, want), name
            assert torch.equal(out, (w.T if transpose else w).to(dtype)), name


@pytest.mark.parametrize("rows", [(0, 11), (0, 1), (3, 10), (10, 11)])
def test_read_into_a_range_of_rows_equals_those_rows_of_a_whole_read(tmp_path, rows):
    """`rows=(a, b)` in chunks of 3 rows: rows a to b of the whole read, cast to fp16; a range
    outside the tensor, or with `transpose`, is a ValueError."""
    w = torch.randn(11, 7, dtype=torch.float32).to(torch.bfloat16)
    (tmp_path / "ckpt").mkdir()
    save_file({"w": w}, tmp_path / "ckpt" / "model.safetensors")
    a, b = rows
    with WeightReader([tmp_path / "ckpt" / "model.safetensors"], dtype=torch.float16) as reader:
        out = torch.empty(b - a, 7, dtype=torch.float16)
        reader.read_into("w", out, rows=rows, chunk_bytes=3 * 7 * 2)
        assert torch.equal(out, w[a:b].to(torch.float16))
        for bad in [(0, 12), (5, 5), (-1, 2)]:
            with pytest.raises(ValueError, match="not a range of its rows"):
                reader.read_into("w", out, rows=bad)
        with pytest.raises(ValueError, match="not a range of its rows"):
            transposed = torch.empty(7, 11, dtype=torch.float16)
            reader.read_into("w", transposed, transpose=True, rows=rows)


@pytest.mark.parametrize("rows", [1, 4, 5, 11])
def test_transposed_copy_in_tiles_equals_one_copy(rows, monkeypatch):
    """`copy_transposed` in tiles of 4 source rows (the last one short or the only one), cast
    bf16 -> fp16, into a contiguous [cols, rows] and into a column slice of a wider tensor
    (how `read_into` fills a chunk): the same values as `dst.copy_(src.T)`. A shape that does
    not transpose into `dst` is a ValueError."""
    from dsc.models import weights

    monkeypatch.setattr(weights, "TRANSPOSE_TILE_ROWS", 4)
    src = torch.randn(rows, 7).to(torch.bfloat16)
    want = src.T.to(torch.float16)
    dst = torch.empty(7, rows, dtype=torch.float16)
    weights.copy_transposed(dst, src)
    assert torch.equal(dst, want)
    wide = torch.zeros(7, rows + 6, dtype=torch.float16)
    weights.copy_transposed(wide[:, 3 : 3 + rows], src)
    assert torch.equal(wide[:, 3 : 3 + rows], want)
    assert not wide[:, :3].any() and not wide[:, 3 + rows :].any()
    with pytest.raises(ValueError, match="transposed"):
        weights.copy_transposed(torch.empty(rows, 7), src)
