"""The tiny models trained on CPU (examples/models): real accuracy through the exported graph.

Random weights cannot show that an export preserves what a model learned; these can. The
held-out perplexity measured through ONNX Runtime must equal PyTorch's and sit far below the
unigram baseline, greedy text must match `generate`, and `dsc run` must write words of the
training text.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from dsc import api
from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.corpus import heldout_text, load_corpus, split_corpus

from .conftest import REPO, run_cli

MODELS = {
    "tiny-deepseek-v3": "DeepseekV3ForCausalLM",
    "tiny-qwen2": "Qwen2ForCausalLM",
}
WINDOW = 128
WINDOWS = 8


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return {
        name: api.export(
            REPO / "examples/models" / name, root / name, dtype="fp32", progress=_quiet
        ).path
        for name in MODELS
    }


def _heldout_windows(tok) -> np.ndarray:
    ids = tok(heldout_text()[:40_000])["input_ids"]
    n = WINDOW * WINDOWS
    assert len(ids) >= n
    return np.array(ids[:n], dtype=np.int64).reshape(WINDOWS, WINDOW)


def _nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token negative log-likelihood."""
    logits = logits[:, :-1].astype(np.float64)
    target = ids[:, 1:]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
    return float((logz - picked).mean())


@pytest.mark.parametrize("name", MODELS)
def test_training_record(name):
    d = REPO / "examples/models" / name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [MODELS[name]]
    rec = json.loads((d / "training.json").read_text())
    assert rec["heldout"]["perplexity"] < rec["heldout"]["unigram_perplexity"] / 4
    assert sum(f.stat().st_size for f in d.glob("*.safetensors")) <= 20 * 2**20


@pytest.mark.parametrize("name", MODELS)
def test_heldout_perplexity_through_onnx(name, trained):
    """ONNX perplexity == PyTorch perplexity, far below the unigram baseline."""
    art = trained[name]
    tok = AutoTokenizer.from_pretrained(art)
    ids = _heldout_windows(tok)
    runner = OrtCausalLM.from_artifact(art)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(WINDOW), ids.shape).copy()
    onnx_ppl = math.exp(_nll(runner.step(ids, mask, pos, runner.empty_past(WINDOWS)).logits, ids))
    model = AutoModelForCausalLM.from_pretrained(
        REPO / "examples/models" / name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch_ppl = math.exp(_nll(model(torch.from_numpy(ids)).logits.numpy(), ids))
    assert onnx_ppl == pytest.approx(torch_ppl, rel=1e-4)

    # Unigram baseline with the same tokenizer: counts on the training split, add-one smoothing.
    train, _ = split_corpus(load_corpus())
    counts = np.bincount(tok(train[:400_000])["input_ids"], minlength=len(tok)) + 1.0
    logp = np.log(counts / counts.sum())
    unigram_ppl = math.exp(-float(logp[ids[:, 1:]].mean()))
    assert onnx_ppl < unigram_ppl / 4, (onnx_ppl, unigram_ppl)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_text_matches_transformers(name, trained):
    art = trained[name]
    tok = AutoTokenizer.from_pretrained(art)
    prompt = tok("And God said")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(
        REPO / "examples/models" / name, dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None
    gen = GenerationConfig(
        max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    with torch.no_grad():
        want = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=gen,
        )[0, len(prompt) :].tolist()
    got = OrtCausalLM.from_artifact(art).generate([prompt], 32, eos_token_id=None)[0]
    assert got == want


def test_dsc_run_writes_words_of_the_training_text(trained, capsys):
    code, out, err = run_cli(
        [
            "run",
            str(trained["tiny-deepseek-v3"]),
            "--prompt",
            "And God said",
            "--max-new-tokens",
            "40",
        ],
        capsys,
    )
    assert code == 0, err
    assert out.startswith("And God said")
    words = re.findall(r"[A-Za-z]+", out[len("And God said") :])
    assert len(words) >= 8, out
    vocabulary = set(re.findall(r"[A-Za-z]+", load_corpus()))
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.9, (known, out)
