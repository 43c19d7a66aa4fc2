"""What `dsc export` writes: the I/O spec, the manifest, fp16 graphs, external data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from dsc import api
from dsc.artifacts import is_artifact
from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.models.checkpoint import sha256_file

from .conftest import FAMILIES, run_cli


def _quiet(msg):
    pass


@pytest.mark.parametrize("family", FAMILIES)
def test_io_spec_describes_the_graph(family, exported, checkpoints):
    art = exported[family]
    io = json.loads((art / "model_io.json").read_text())
    cfg = json.loads((checkpoints[family] / "config.json").read_text())
    proto = onnx.load(str(art / io["onnx"]), load_external_data=False)
    assert [i["name"] for i in io["inputs"]] == [i.name for i in proto.graph.input]
    assert [o["name"] for o in io["outputs"]] == [o.name for o in proto.graph.output]
    layers = cfg["num_hidden_layers"]
    cache = io["cache"]
    assert cache["num_layers"] == layers
    assert len(cache["inputs"]) == len(cache["outputs"]) == 2 * layers
    shapes = {i["name"]: i["shape"] for i in io["inputs"]}
    assert shapes["input_ids"] == ["batch", "seq"]
    assert shapes["attention_mask"] == ["batch", "total_seq"]
    if family.startswith("deepseek"):
        # MLA: the compressed latent and the rotary key, not expanded K/V.
        assert cache["kind"] == "mla"
        assert shapes["past_key_values.0.compressed_kv"] == [
            "batch",
            1,
            "past",
            cfg["kv_lora_rank"],
        ]
        assert shapes["past_key_values.0.k_pe"] == ["batch", 1, "past", cfg["qk_rope_head_dim"]]
        per_token = layers * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    else:
        kv = cfg["num_key_value_heads"]
        hd = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert shapes["past_key_values.0.key"] == ["batch", kv, "past", hd]
        per_token = 2 * layers * kv * hd * 4
    assert cache["bytes_per_token"] == per_token
    assert (art / "tokenizer.json").is_file() and (art / "tokenizer_config.json").is_file()


def test_manifest_hashes_inputs_and_outputs(exported, checkpoints):
    art = exported["deepseek_v3"]
    assert is_artifact(art)
    m = json.loads((art / "manifest.json").read_text())
    assert m["schema_version"] == 1
    assert m["source"]["architecture"] == "DeepseekV3ForCausalLM"
    ck = checkpoints["deepseek_v3"]
    assert m["source"]["inputs"]["model.safetensors"] == sha256_file(ck / "model.safetensors")
    assert m["source"]["inputs"]["tokenizer.json"] == sha256_file(ck / "tokenizer.json")
    for name, digest in m["outputs"].items():
        assert sha256_file(art / name) == digest, name
    assert m["tools"]["torch"] == torch.__version__.split("+")[0] or m["tools"]["torch"]


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_fp16_export_tracks_fp32_reference(family, tmp_path, checkpoints):
    """fp16 graph: logits close to the fp32 PyTorch model, same top-1 on most positions."""
    art = api.export(checkpoints[family], tmp_path / "fp16", dtype="fp16", progress=_quiet).path
    runner = OrtCausalLM.from_artifact(art)
    assert runner.cache_dtype == np.float16
    model = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, runner.io["vocab_size"], size=(2, 16))
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(16), ids.shape).copy()
    got = runner.step(ids, mask, pos, runner.empty_past(2)).logits.astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 0.02 * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_large_models_use_external_data(tmp_path, checkpoints, monkeypatch):
    import dsc.export.onnx_export as ex

    monkeypatch.setattr(ex, "EXTERNAL_DATA_THRESHOLD", 0)
    art = api.export(checkpoints["llama"], tmp_path / "ext", dtype="fp32", progress=_quiet).path
    data = art / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > (art / "model.onnx").stat().st_size
    m = json.loads((art / "manifest.json").read_text())
    assert "model.onnx.data" in m["outputs"]
    runner = OrtCausalLM.from_artifact(art)
    out = runner.step(
        np.array([[5, 6, 7]]),
        np.ones((1, 3), np.int64),
        np.array([[0, 1, 2]]),
        runner.empty_past(1),
    )
    assert np.isfinite(out.logits).all()


def test_cli_export_and_run(tmp_path, checkpoints, capsys):
    out = tmp_path / "art"
    code, stdout, err = run_cli(
        ["export", str(checkpoints["qwen2"]), "-o", str(out), "--dtype", "fp32", "--opset", "20"],
        capsys,
    )
    assert code == 0, err
    assert "exported qwen2" in stdout
    assert json.loads((out / "model_io.json").read_text())["opset"] == 20
    code, stdout, err = run_cli(
        ["run", str(out), "--prompt", "And God said", "--max-new-tokens", "5"], capsys
    )
    assert code == 0, err
    assert stdout.startswith("And God said")
    assert len(stdout.strip()) > len("And God said")


def test_artifact_directory_has_umask_permissions(exported):
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert (exported["llama"].stat().st_mode & 0o777) == (0o777 & ~umask)
