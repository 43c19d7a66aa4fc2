"""EngineCausalLM, run against the STAND-IN TensorRT runtime (`dsc.runtime.standin`).

The stand-in is not TensorRT: it executes the artifact's ONNX graph in ONNX Runtime on the CPU
behind the subset of TensorRT's runtime API the runner uses. What these tests check is the
runner's own logic (profile choice by shape, binding shapes and addresses, the KV-cache loop,
CUDA-graph bookkeeping, the compatibility checks); a real engine is tested by
`scripts/gpu_checks.py` on a GPU machine (tests marked `gpu`, skipped here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsc import api
from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.backends.tensorrt import ShapeEnvelope
from dsc.errors import BadInput, Unsupported
from dsc.runtime import standin
from dsc.runtime.engine import DeviceTensor, EngineCausalLM, check_compatible, load_runtime

REPO = Path(__file__).resolve().parents[1]
ENVELOPE = ShapeEnvelope(max_batch=4, max_input_len=16, max_kv=48, max_num_tokens=32)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "v3-fp16"
    api.export(
        REPO / "examples/models/tiny-deepseek-v3", out, dtype="fp16", progress=lambda m: None
    )
    standin.install_engine(out, "l4", ENVELOPE, sm=89)
    return out


def _runner(artifact, **kw) -> EngineCausalLM:
    return EngineCausalLM.from_artifact(artifact, "l4", runtime="standin", **kw)


def _prompt(batch, length, seed=0):
    ids = np.random.default_rng(seed).integers(3, 200, size=(batch, length))
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(length), ids.shape).copy()
    return ids, mask, pos


def test_profiles_are_the_builders_and_selection_follows_shape(artifact):
    """Stand-in engine: profile 0 prefill (batch <= 32 // 16 = 2), profile 1 decode."""
    r = _runner(artifact)
    assert r.profiles[0]["input_ids"] == ((1, 1), (1, 8), (2, 16))
    assert r.profiles[1]["input_ids"] == ((1, 1), (2, 1), (4, 1))
    past = r.past_names[0]
    assert r.profiles[1][past][2][2] == 47 and r.profiles[0][past][2][2] == 32

    def full(b, s, p):
        d = {"input_ids": (b, s), "attention_mask": (b, p + s), "position_ids": (b, s)}
        for n, (h, dim) in zip(r.past_names, r.entries * r.num_layers, strict=False):
            d[n] = (b, h, p, dim)
        return d

    assert r.select_profile(full(1, 7, 0)) == 0  # a prompt
    assert r.select_profile(full(1, 1, 0)) == 0  # a one-token prompt: decode needs past >= 1
    assert r.select_profile(full(3, 1, 20)) == 1  # a decode step
    assert r.select_profile(full(1, 1, 40)) == 1  # past beyond the prefill profile's 32
    assert r.select_profile(full(5, 1, 20)) is None  # batch beyond both


def test_logits_equal_onnxruntime_prefill_and_decode(artifact):
    """Stand-in: the runner's logits over prefill + 6 decode steps equal OrtCausalLM's exactly."""
    ort = OrtCausalLM.from_artifact(artifact)
    r = _runner(artifact, cuda_graphs=False)
    ids, mask, pos = _prompt(2, 9)
    a = ort.step(ids, mask, pos, ort.empty_past(2))
    b = r.step(ids, mask, pos, r.empty_past(2))
    np.testing.assert_array_equal(b.logits, a.logits)
    assert all(isinstance(t, DeviceTensor) for t in b.present)
    assert [t.shape for t in b.present] == [p.shape for p in a.present]
    np.testing.assert_array_equal(np.asarray(b.present[0]), a.present[0])
    for k in range(6):
        tok = a.logits[:, -1].argmax(-1)[:, None]
        mask = np.ones((2, 10 + k), dtype=np.int64)
        p = np.full((2, 1), 9 + k)
        a = ort.step(tok, mask, p, a.present)
        b = r.step(tok, mask, p, b.present)
        np.testing.assert_array_equal(b.logits, a.logits)
    assert r.graph_stats.profile_steps == {0: 1, 1: 6}
    assert r.graph_stats.profile_switches == 1
    assert float(a.logits.astype(np.float32).std()) > 0.1  # the numbers compared are not trivial


def test_generate_matches_onnxruntime(artifact):
    ort = OrtCausalLM.from_artifact(artifact)
    r = _runner(artifact)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    assert r.generate(prompts, 12) == ort.generate(prompts, 12)


def test_cuda_graph_bookkeeping_and_replay_numbers(artifact):
    """Stand-in graphs: first sight eager, second capture, then replay; same logits as eager."""
    eager = _runner(artifact, cuda_graphs=False)
    g = _runner(artifact, max_graphs=4)
    ids, mask, pos = _prompt(1, 6, seed=1)
    runs = []
    for _ in range(3):
        out = g.step(ids, mask, pos, g.empty_past(1))
        tok = out.logits[:, -1].argmax(-1)[:, None]
        logits = []
        for k in range(4):
            out = g.step(tok, np.ones((1, 7 + k), np.int64), np.full((1, 1), 6 + k), out.present)
            logits.append(out.logits)
            tok = out.logits[:, -1].argmax(-1)[:, None]
        runs.append(logits)
    ref = eager.generate([list(ids[0])], 5)
    assert [int(x[0, -1].argmax()) for x in runs[2]] == ref[0][1:]
    for rep in (1, 2):
        for x, y in zip(runs[0], runs[rep], strict=False):
            np.testing.assert_array_equal(x, y)
    s = g.graph_stats
    # 4 decode shapes: repetition 0 runs them eagerly, 1 captures them, 2 replays them.
    assert (s.graph_captures, s.graph_replays, s.graph_evictions) == (4, 4, 0)
    assert s.eager_steps == 3 + 4  # three prefills + repetition 0's decode steps
    # Only the first decode step's cache (from a new prefill) is copied into the graph's; each
    # later graph was captured on the previous graph's own output buffers.
    assert s.past_copies == len(g.past_names)


def test_graph_cache_is_bounded(artifact):
    """Stand-in: 4 recurring shapes through 3 slots: least recently used goes, every time."""
    g = _runner(artifact, max_graphs=3)
    for _ in range(3):
        g.generate([[7, 8, 9, 10]], 5)
    s = g.graph_stats
    assert len(g._graphs) == 3
    assert (s.graph_captures, s.graph_evictions, s.graph_replays) == (8, 5, 0)


def test_graph_switch_off(artifact):
    r = _runner(artifact, cuda_graphs=False)
    for _ in range(3):
        r.generate([[4, 5, 6]], 4)
    assert r.graph_stats.graph_captures == 0 and r.graph_stats.graph_replays == 0
    assert r.graph_stats.eager_steps == 12


def test_prefill_batch_beyond_profile_runs_in_passes(artifact):
    """Prefill batch 3 > the profile's 2: two passes, logits and cache equal ONNX Runtime's."""
    ort = OrtCausalLM.from_artifact(artifact)
    r = _runner(artifact)
    ids, mask, pos = _prompt(3, 8, seed=2)
    a = ort.step(ids, mask, pos, ort.empty_past(3))
    b = r.step(ids, mask, pos, r.empty_past(3))
    np.testing.assert_array_equal(b.logits, a.logits)
    np.testing.assert_array_equal(np.asarray(b.present[-1]), a.present[-1])
    assert r.graph_stats.split_prefills == 1 and r.graph_stats.profile_steps[0] == 2


def test_shape_beyond_every_profile_is_unsupported(artifact):
    r = _runner(artifact)
    ids, mask, pos = _prompt(1, 17)  # max input length is 16
    with pytest.raises(Unsupported, match="outside every optimization profile"):
        r.step(ids, mask, pos, r.empty_past(1))


def test_version_and_sm_mismatch_name_both(artifact):
    rt = load_runtime("standin")
    entry = {"backend": "tensorrt", "trt_version": "10.13.0", "target_sm": 89}
    with pytest.raises(Unsupported, match=r"10\.13\.0.*0\.0-standin"):
        check_compatible(entry, 89, rt)
    entry = {"backend": "tensorrt", "trt_version": standin.__version__, "target_sm": 87}
    with pytest.raises(Unsupported, match=r"SM87.*SM89"):
        check_compatible(entry, 87, rt)
    check_compatible(entry | {"target_sm": 89}, 89, rt)


def test_engine_the_runtime_cannot_read(artifact, tmp_path):
    bad = tmp_path / "model.engine"
    bad.write_bytes(b"\x00not an engine")
    with pytest.raises(BadInput, match="cannot deserialize"):
        EngineCausalLM(bad, OrtCausalLM.from_artifact(artifact).io, runtime=load_runtime("standin"))


def test_no_gpu_or_runtime_is_unsupported(monkeypatch):
    """Here there is no GPU: the real runtimes refuse with exit 4, in one line."""
    for flavour in ("tensorrt", "tensorrt_rtx"):
        with pytest.raises(Unsupported) as e:
            load_runtime(flavour)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("graphs", [True, False])
def test_native_graphs_of_tensorrt_rtx_are_switched_on_the_context(artifact, graphs):
    """Stand-in posing as a runtime with native CUDA graphs (as TensorRT-RTX): the runner sets
    the context's strategy and captures nothing itself; logits unchanged."""
    from dataclasses import replace

    rt = replace(load_runtime("standin"), native_graphs=True)
    io = OrtCausalLM.from_artifact(artifact).io
    r = EngineCausalLM(artifact / "engines/l4/model.engine", io, runtime=rt, cuda_graphs=graphs)
    want = (
        standin.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if graphs
        else standin.CudaGraphStrategy.DISABLED
    )
    assert r.context.runtime_config.cuda_graph_strategy == want
    out = r.generate([[5, 6, 7]], 4)
    assert out == OrtCausalLM.from_artifact(artifact).generate([[5, 6, 7]], 4)
    s = r.graph_stats
    assert s.graph_captures == 0 and s.native_graph_steps == (4 if graphs else 0)


def test_device_memory_is_released_with_the_runner(artifact):
    """Stand-in memory: every buffer (cache, outputs, graphs' own) is freed once the runner
    and its outputs are gone; none leak per step."""
    import gc

    gc.collect()
    before = len(standin.MEMORY.blocks)
    r = _runner(artifact)
    for _ in range(3):
        r.generate([[5, 6, 7, 8]], 6)
    assert len(standin.MEMORY.blocks) > before  # the graphs' buffers live with the runner
    del r
    gc.collect()
    assert len(standin.MEMORY.blocks) == before
