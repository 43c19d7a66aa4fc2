"""`random_checkpoint` streams: meta-device model, tensors drawn one at a time, written in shards.

Checked against what `save_pretrained` writes for the same config (same tensor names, shapes
and dtypes; the checkpoint loads with no missing or unexpected key), the init rules, per-name
reproducibility, sharding, and its memory bound.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsc.fixtures import FAMILIES
from tests.conftest import REPO


@pytest.mark.parametrize("family", FAMILIES)
def test_same_tensors_as_save_pretrained_and_loads(family, checkpoints, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "r"
    from dsc.fixtures import random_checkpoint

    random_checkpoint(
        checkpoints[family] / "config.json",
        out,
        dtype="bf16",
        tokenizer_dir=checkpoints[family],
        shard_bytes=64 * 1024,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1  # 64 KiB shards: several
    got = {}
    for f in files:
        with safe_open(str(out / f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                got[k] = h.get_tensor(k)
    # save_pretrained's tensors for the same architecture (the fixture itself was saved so).
    with safe_open(str(checkpoints[family] / "model.safetensors"), "pt") as h:
        want = {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118
    assert {k: tuple(v.shape) for k, v in got.items()} == want
    # bf16 storage, except what transformers itself keeps in fp32 (5.24: the MoE router and
    # its score-correction bias).
    kept = {k for k, v in got.items() if v.dtype != torch.bfloat16}
    assert all(".mlp.gate." in k and got[k].dtype == torch.float32 for k in kept)
    assert index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in got.values()
    )
    std = json.loads((out / "config.json").read_text()).get("initializer_range", 0.02)
    for k, v in got.items():
        if k.endswith("norm.weight"):
            assert torch.equal(v, torch.ones_like(v)), k
        elif k.endswith("bias"):
            assert not v.any(), k
        elif v.numel() > 1000:
            assert abs(v.float().std().item() - std) < 0.2 * std, k  # config initializer_range
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_reproducible_per_name(checkpoints, tmp_path):
    from safetensors.torch import load_file

    from dsc.fixtures import random_checkpoint

    cfg = checkpoints["qwen2"] / "config.json"
    a = random_checkpoint(cfg, tmp_path / "a", tokenizer_dir=checkpoints["qwen2"])
    b = random_checkpoint(
        cfg, tmp_path / "b", tokenizer_dir=checkpoints["qwen2"], shard_bytes=32 * 1024
    )
    c = random_checkpoint(cfg, tmp_path / "c", tokenizer_dir=checkpoints["qwen2"], seed=1)
    ta = load_file(a / "model.safetensors")
    tb = {}
    for f in sorted(b.glob("model-*.safetensors")):
        tb.update(load_file(f))
    tc = load_file(c / "model.safetensors")
    assert ta.keys() == tb.keys()
    assert all((ta[k] == tb[k]).all() for k in ta)  # the same tensors, however sharded
    w = "model.layers.0.mlp.up_proj.weight"
    assert not (ta[w] == tc[w]).all()  # another seed, other values


def test_peak_memory_about_one_shard(tmp_path):
    """A 0.9 GB fp16 checkpoint written with 64 MiB shards: the writer's peak RSS grows by far
    less than the checkpoint (measured in a child process from after its imports)."""
    cfg = json.loads(
        (REPO / "examples/configs/DeepSeek-R1-Distill-Qwen-1.5B/config.json").read_text()
    )
    cfg.update(num_hidden_layers=4)  # 1.5B's width, 4 layers: 0.47 G parameters, 0.94 GB fp16
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    code = (
        "import resource, sys, torch, transformers\n"
        "from dsc.fixtures import random_checkpoint\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "random_checkpoint(sys.argv[1], sys.argv[2], dtype='fp16', shard_bytes=64 * 2**20,\n"
        "                  tokenizer_dir=None)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cfg"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    grew = int(res.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in (tmp_path / "o").glob("*.safetensors"))
    assert size > 0.9e9
    # The embedding (151,936 x 1,536 fp16, 467 MB) is one tensor and so one shard by itself.
    assert grew < 0.65 * size, (grew, size)
