"""The exported graph against the unpatched transformers model, for every family.

ONNX Runtime runs the fp32 export; PyTorch runs the checkpoint exactly as transformers loads it
(default attention and experts implementation, DeepSeek-V2's complex RoPE untouched). Both get
the same inputs: a prefill and 3 decode steps at two batch sizes and lengths that differ from the
export example (batch 2, seq 3, past 5), left-padded batches, MoE inputs that route to experts
the export example never used, and 32 greedy tokens against `generate`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig

from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.export.onnx_export import EXAMPLE_BATCH, EXAMPLE_PAST, EXAMPLE_SEQ, example_inputs
from dsc.models.families import family_by_name

from .conftest import FAMILIES

# fp32 end to end; differences come from kernel order only.
ATOL = 1e-4
RTOL = 1e-4


@pytest.fixture(scope="module")
def references(checkpoints):
    cache = {}

    def get(family: str):
        if family not in cache:
            m = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32)
            cache[family] = m.eval()
        return cache[family]

    return get


def torch_step(model, ids, mask, pos, past):
    cache = DynamicCache(config=model.config)
    if past is not None:
        for i in range(0, len(past), 2):
            cache.update(torch.from_numpy(past[i]), torch.from_numpy(past[i + 1]), i // 2)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            past_key_values=cache,
            use_cache=True,
        )
    present = []
    for layer in out.past_key_values.layers:
        present += [layer.keys.numpy(), layer.values.numpy()]
    return out.logits.numpy(), present


def _random_prompts(vocab: int, batch: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(batch, length), dtype=np.int64)


def _check_close(got, want, what):
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=what)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch,length", [(1, 7), (3, 11)])
def test_prefill_and_decode_match_pytorch(family, batch, length, exported, references):
    assert (batch, length) != (EXAMPLE_BATCH, EXAMPLE_SEQ)
    runner = OrtCausalLM.from_artifact(exported[family])
    model = references(family)
    ids = _random_prompts(runner.io["vocab_size"], batch, length, seed=batch * 100 + length)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(length), ids.shape).copy()

    got = runner.step(ids, mask, pos, runner.empty_past(batch))
    want_logits, want_present = torch_step(model, ids, mask, pos, None)
    _check_close(got.logits, want_logits, f"{family} prefill logits")
    assert len(got.present) == len(want_present) == 2 * runner.num_layers
    for name, g, w in zip(runner.present_names, got.present, want_present, strict=False):
        assert g.shape == w.shape, name
        _check_close(g, w, f"{family} prefill {name}")

    past_ort, past_ref = got.present, want_present
    for step in range(3):
        tok = want_logits[:, -1].argmax(-1)[:, None]
        mask = np.ones((batch, length + step + 1), dtype=np.int64)
        pos = np.full((batch, 1), length + step, dtype=np.int64)
        got = runner.step(tok, mask, pos, past_ort)
        want_logits, want_present = torch_step(model, tok, mask, pos, past_ref)
        _check_close(got.logits, want_logits, f"{family} decode {step} logits")
        for name, g, w in zip(runner.present_names, got.present, want_present, strict=False):
            assert g.shape[2] == length + step + 1, name
            _check_close(g, w, f"{family} decode {step} {name}")
        past_ort, past_ref = got.present, want_present


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_matches_pytorch(family, exported, references):
    runner = OrtCausalLM.from_artifact(exported[family])
    model = references(family)
    lengths = [4, 9]
    width = max(lengths)
    ids = _random_prompts(runner.io["vocab_size"], 2, width, seed=7)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : width - n] = 2  # pad
        mask[row, width - n :] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    got = runner.step(ids, mask, pos, runner.empty_past(2))
    want, want_present = torch_step(model, ids, mask, pos, None)
    for row, n in enumerate(lengths):
        _check_close(got.logits[row, width - n :], want[row, width - n :], f"{family} row {row}")
    tok = want[:, -1].argmax(-1)[:, None]
    mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    got = runner.step(tok, mask, pos[:, -1:] + 1, got.present)
    want, _ = torch_step(model, tok, mask, pos[:, -1:] + 1, want_present)
    _check_close(got.logits, want, f"{family} padded decode")


def _routing(model, run) -> set[tuple[int, int]]:
    """(layer, expert) pairs the routers chose while `run()` executed."""
    chosen: set[tuple[int, int]] = set()
    hooks = []
    for idx, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue

        def hook(module, args, idx=idx):
            for e in args[1].flatten().tolist():
                chosen.add((idx, int(e)))

        hooks.append(experts.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return chosen


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_moe_routing_stays_data_dependent(family, exported, references):
    """Inputs that route to experts the export example never used still match PyTorch."""
    runner = OrtCausalLM.from_artifact(exported[family])
    model = references(family)
    config = json.loads((exported[family] / "config.json").read_text())
    fam = family_by_name(family)
    ex_ids, ex_mask, ex_pos, ex_cache = example_inputs(
        config, fam, batch=EXAMPLE_BATCH, seq=EXAMPLE_SEQ, past=EXAMPLE_PAST, dtype=torch.float32
    )
    example_routes = _routing(
        model,
        lambda: torch_step(
            model, ex_ids.numpy(), ex_mask.numpy(), ex_pos.numpy(), [c.numpy() for c in ex_cache]
        ),
    )
    assert example_routes, "hooks saw no routing: the test would prove nothing"

    ids = _random_prompts(runner.io["vocab_size"], 2, 24, seed=11)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(24), ids.shape).copy()
    want = {}
    test_routes = _routing(
        model, lambda: want.setdefault("out", torch_step(model, ids, mask, pos, None))
    )
    unseen = test_routes - example_routes
    assert len(unseen) >= 4, f"test inputs reuse the example's experts: {sorted(unseen)}"
    got = runner.step(ids, mask, pos, runner.empty_past(2))
    _check_close(got.logits, want["out"][0], f"{family} logits on unseen experts")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, exported, references):
    runner = OrtCausalLM.from_artifact(exported[family])
    model = references(family)
    prompt = _random_prompts(runner.io["vocab_size"], 1, 6, seed=3)
    gen = GenerationConfig(
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=runner.io["pad_token_id"],
    )
    # generate() fills unset fields from the model's own generation config, EOS included.
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        want = model.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones_like(torch.from_numpy(prompt)),
            generation_config=gen,
        )[0, prompt.shape[1] :].tolist()
    got = runner.generate(prompt.tolist(), 32, eos_token_id=None)[0]
    assert len(want) == 32
    assert got == want
