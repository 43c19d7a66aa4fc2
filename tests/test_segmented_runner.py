"""`SegmentedCausalLM`: a graph run one decoder layer at a time, as the gate, the smoke check,
`dsc run` and the layer locator run graphs over 1 GiB of weights (`causal_lm`).

- every family (fp32): the same logits and KV cache as the whole graph in one session, through
  a left-padded prefill and decode steps, with no session kept and with all kept;
- the trained tiny models in fp16 (optimized, If branches included): within one fp16 step of
  the largest logit (ONNX Runtime rounds fp16 values at a segment's edge, not inside a graph),
  and the same greedy tokens;
- sessions: none kept means one per segment per step; every segment kept means one each;
- the accuracy gate and its locator on a quantized graph give the whole graph's verdict and
  the same first divergence, one layer at a time;
- on a graph `dsc quantize` wrote, each weight's DequantizeLinear runs in its layer's segment:
  nothing computed from weights is carried between segments.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.backends.onnxruntime.segmented import SegmentedCausalLM, causal_lm
from tests.conftest import REPO


def _io(artifact):
    return json.loads((artifact / "model_io.json").read_text())


def _steps(lm, vocab, decode=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (2, 7))
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # left padding
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    out = lm.step(ids, mask, pos, lm.empty_past(2))
    yield out
    nxt = pos[:, -1:] + 1
    for _ in range(decode):
        tok = rng.integers(0, vocab, (2, 1))
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        out = lm.step(tok, mask, nxt, out.present)
        nxt = nxt + 1
        yield out


def _max_diff(a_lm, b_lm, vocab) -> tuple[float, float]:
    worst, scale = 0.0, 0.0
    for a, b in zip(_steps(a_lm, vocab), _steps(b_lm, vocab), strict=True):
        for x, y in [(a.logits, b.logits), *zip(a.present, b.present, strict=True)]:
            assert x.shape == y.shape and x.dtype == y.dtype
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max()))
        scale = max(scale, float(np.abs(a.logits).max()))
    return worst, scale


@pytest.mark.parametrize("family", ["llama", "qwen2", "deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("keep", [0, 1 << 40])
def test_segmented_equals_whole_graph_fp32(exported, family, keep):
    art = exported[family]
    io = _io(art)
    whole = OrtCausalLM(art / io["onnx"], io)
    seg = SegmentedCausalLM(art / io["onnx"], io, keep_bytes=keep)
    worst, _ = _max_diff(whole, seg, io["vocab_size"])
    assert worst <= 1e-5, worst
    segments = len(seg._plan)
    assert segments == int(io["cache"]["num_layers"]) + 1
    steps = 4
    assert seg.sessions_made == (segments if keep else segments * steps)


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    from dsc import api

    root = tmp_path_factory.mktemp("seg")
    out = {}
    for name, profile in (("tiny-deepseek-v3", "rtx-4090"), ("tiny-qwen2", "jetson-orin")):
        exp = api.export(REPO / "examples/models" / name, root / f"{name}-e", dtype="fp16").path
        out[name] = api.optimize(exp, root / name, profile=profile).path
    return out


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-qwen2"])
def test_segmented_fp16_within_one_step_and_same_greedy(tiny_fp16, name):
    art = tiny_fp16[name]
    io = _io(art)
    whole, seg = OrtCausalLM(art / io["onnx"], io), SegmentedCausalLM(art / io["onnx"], io)
    worst, scale = _max_diff(whole, seg, io["vocab_size"])
    print(f"{name}: max abs difference {worst:.3g} (largest logit {scale:.3g})")
    assert worst <= 2 * 2.0**-10 * max(scale, 1.0)
    prompts = [[5, 17, 99, 3], [42, 7]]
    assert whole.generate(prompts, 16) == seg.generate(prompts, 16)


def test_causal_lm_picks_by_size(tiny_fp16, monkeypatch):
    from dsc.backends.onnxruntime import runner

    art = tiny_fp16["tiny-qwen2"]
    io = _io(art)
    assert isinstance(causal_lm(art / io["onnx"], io), OrtCausalLM)
    monkeypatch.setattr(runner, "ARENA_MAX_WEIGHT_BYTES", 0)
    assert isinstance(causal_lm(art / io["onnx"], io), SegmentedCausalLM)
    assert isinstance(causal_lm(art / io["onnx"], io, by_layer=False), OrtCausalLM)


def test_gate_and_locator_one_layer_at_a_time(tiny_fp16, tmp_path, monkeypatch):
    """The validate stage's gate on a broken INT8 graph (one layer's weight scales x10),
    whole-graph and layer-wise (the size threshold lowered to 0): the same verdict, metrics
    within 1e-3, and the locator names the same first divergence."""
    import onnx_ir as ir

    from dsc.backends.onnxruntime import runner
    from dsc.stages.validate import VALIDATE
    from dsc.validate.gate import GateOptions
    from dsc.validate.run import default_text
    from tests.test_validate import _int8_weights

    src = tiny_fp16["tiny-deepseek-v3"]
    art = tmp_path / "int8"
    shutil.copytree(src, art)
    (art / "reference").mkdir()
    for f in ("model.onnx", "model_io.json"):
        shutil.copy2(src / f, art / "reference" / f)
    model = ir.load(str(src / "model.onnx"))
    _int8_weights(model, scale_layer=2, factor=10.0)
    ir.save(model, art / "model.onnx")
    io = _io(art)
    opts = GateOptions(window=32, windows=3, decode_steps=3, prompts=2, gen_len=6)

    def gate():
        return VALIDATE.gate(
            art / "model.onnx",
            io,
            art / "reference" / "model.onnx",
            io,
            "reference",
            art,
            default_text(),
            precision="int8",
            options=opts,
            quiet=True,
        )

    whole = gate()
    monkeypatch.setattr(runner, "ARENA_MAX_WEIGHT_BYTES", 0)
    made = []
    real = SegmentedCausalLM.__init__

    def spy(self, *a, **kw):
        made.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(SegmentedCausalLM, "__init__", spy)
    seg = gate()
    assert len(made) >= 4  # reference, candidate, and the locator's two graphs
    assert whole["passed"] is False and seg["passed"] is False
    assert seg["first_divergence"]["module"] == whole["first_divergence"]["module"]
    assert "layers.2" in seg["first_divergence"]["module"]
    for phase in ("prefill", "decode"):
        for key in ("cosine_mean", "kl_mean", "top1"):
            assert abs(seg[phase][key] - whole[phase][key]) <= 1e-3, (phase, key)


def test_quantized_weights_stay_in_their_layer(tiny_fp16, tmp_path, monkeypatch):
    """On a graph `dsc quantize` wrote (INT8 weight-only: a DequantizeLinear per weight, with no
    layer scope), each constant node runs in the segment of its reader: no value computed from
    weights alone is ever carried from one segment to another (in segment 0 they dequantized
    every weight of the model and carried it to its layer: 6 GB at 1.5B), and the runner gives
    the whole graph's numbers."""
    import onnx

    from dsc import api
    from dsc.passes.quant.layerwise import SegmentPlan, reads

    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "cache"))
    art = api.quantize(
        tiny_fp16["tiny-qwen2"], tmp_path / "w8", "int8", weight_only=True, samples=2, seq_len=16
    ).path
    io = _io(art)
    proto = onnx.load(str(art / io["onnx"]))
    g = proto.graph
    plan = SegmentPlan(proto)
    # values computed from weights alone (a shared Constant scalar may be carried: no weight)
    inits = {t.name for t in g.initializer}
    const, weights = set(inits), set(inits)
    for n in g.node:
        if all(r in const for r in reads(n)):
            const.update(n.output)
            if any(r in weights for r in reads(n)):
                weights.update(n.output)
    dq = [i for i, n in enumerate(g.node) if n.op_type == "DequantizeLinear"]
    assert len(dq) == 6 * int(io["cache"]["num_layers"])  # q, k, v, o, gate_up, down
    carried = set().union(*plan.carry)
    assert not carried & weights, sorted(carried & weights)[:5]
    seg_of = {i: k for k, idxs in enumerate(plan.segments) for i in idxs}
    for i in dq:
        readers = [seg_of[j] for j, n in enumerate(g.node) if set(g.node[i].output) & set(reads(n))]
        assert readers and seg_of[i] == min(readers)
    assert {seg_of[i] for i in dq} == set(range(1, len(plan)))  # every layer's
    whole, seg = OrtCausalLM(art / io["onnx"], io), SegmentedCausalLM(art / io["onnx"], io)
    worst, scale = _max_diff(whole, seg, io["vocab_size"])
    assert worst <= 2 * 2.0**-10 * max(scale, 1.0), (worst, scale)
