"""Checkpoints as DeepSeek publishes them export and match transformers.

- FP8 blocks (V3/R1 layout, with the MTP layer): the ONNX export is compared with transformers
  running in fp32 on weights dequantized by the independent reference loop in `test_weights`,
  saved as a plain checkpoint.
- Sharded bf16 with `model.safetensors.index.json`: compared with transformers loading the same
  shards.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from dsc import api
from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.fixtures import read_tensors, write_sharded

from .test_export import _random_prompts, torch_step
from .test_weights import reference_dequantize

MAX_REL = 1e-3  # max |onnx - torch| / max |torch|, fp32 on both sides


def _max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _reference_checkpoint(fp8_dir, out_dir):
    """The FP8 checkpoint dequantized by the reference loop, as a plain fp32 checkpoint."""
    config = json.loads((fp8_dir / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    mtp = f"model.layers.{config['num_hidden_layers']}."
    raw = read_tensors(fp8_dir)
    plain = {}
    for name, t in raw.items():
        if name.startswith(mtp) or name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            plain[name] = torch.from_numpy(reference_dequantize(t, raw[name + "_scale_inv"], block))
        else:
            plain[name] = t.float()
    out_dir.mkdir()
    save_file(plain, out_dir / "model.safetensors", metadata={"format": "pt"})
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config))
    for f in fp8_dir.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def _compare(artifact, reference, *, batch=2, length=6, seed=5):
    runner = OrtCausalLM.from_artifact(artifact)
    ids = _random_prompts(runner.io["vocab_size"], batch, length, seed=seed)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(length), ids.shape).copy()
    got = runner.step(ids, mask, pos, runner.empty_past(batch))
    want_logits, want_present = torch_step(reference, ids, mask, pos, None)
    errors = {"logits": _max_rel(got.logits, want_logits)}
    for name, g, w in zip(runner.present_names, got.present, want_present, strict=True):
        errors[name] = _max_rel(g, w)
    # one decode step on the cache each produced
    tok = want_logits[:, -1].argmax(-1)[:, None]
    mask = np.ones((batch, length + 1), dtype=np.int64)
    pos = np.full((batch, 1), length, dtype=np.int64)
    got = runner.step(tok, mask, pos, got.present)
    want_logits, _ = torch_step(reference, tok, mask, pos, want_present)
    errors["decode logits"] = _max_rel(got.logits, want_logits)
    return errors


def test_fp8_block_checkpoint_exports_and_matches_reference_dequantization(
    fp8_checkpoint, fp8_reference, tmp_path
):
    config = json.loads((fp8_checkpoint / "config.json").read_text())
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576
    messages: list[str] = []
    out = tmp_path / "art"
    api.export(fp8_checkpoint, out, dtype="fp32", progress=messages.append)
    mtp = [m for m in messages if "multi-token-prediction" in m]
    assert len(mtp) == 1 and "12 tensors" in mtp[0] and "model.layers.3." in mtp[0], messages

    reference = AutoModelForCausalLM.from_pretrained(fp8_reference, dtype=torch.float32).eval()
    errors = _compare(out, reference)
    worst = max(errors, key=errors.get)
    print("max relative error per output:", errors)
    assert errors[worst] <= MAX_REL, errors


def test_sharded_bf16_checkpoint_exports_and_matches_transformers(checkpoints, tmp_path):
    ckpt = write_sharded(checkpoints["deepseek_v3"], tmp_path / "ckpt", shards=3)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert {t.dtype for t in read_tensors(ckpt).values()} == {torch.bfloat16}
    out = tmp_path / "art"
    api.export(ckpt, out, dtype="fp32", progress=lambda m: None)
    manifest = json.loads((out / "manifest.json").read_text())
    hashed = json.dumps(manifest["source"])
    assert all(f in hashed for f in index["weight_map"].values())  # every shard is an input

    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    errors = _compare(out, reference)
    assert max(errors.values()) <= 1e-4, errors


@pytest.fixture(scope="module")
def fp8_reference(fp8_checkpoint, tmp_path_factory):
    return _reference_checkpoint(fp8_checkpoint, tmp_path_factory.mktemp("fp8ref") / "ref")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fp8_load_equals_reference_dequantization_exactly(fp8_checkpoint, fp8_reference, dtype):
    """Every parameter dsc loads from the FP8 checkpoint is bit-identical to transformers loading
    the reference-dequantized weights (fused experts and the fp32 router included)."""
    from dsc.export.onnx_export import load_model
    from dsc.models.checkpoint import inspect_checkpoint

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    want = AutoModelForCausalLM.from_pretrained(fp8_reference, dtype=torch_dtype).state_dict()
    got = load_model(inspect_checkpoint(fp8_checkpoint), dtype).state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k
