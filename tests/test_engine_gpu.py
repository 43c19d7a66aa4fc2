"""Engines on a real GPU: build the tiny fp16 model for this device, run it with EngineCausalLM.

Marked `gpu`; every test is skipped, with the reason, where there is no CUDA GPU or no
TensorRT / TensorRT-RTX runtime (every dsc build machine). `scripts/gpu_checks.py` runs this
file on a GPU machine and prints one summary line per check. `DSC_GPU_RUNTIME` picks the
runtime (tensorrt or tensorrt_rtx; default: whichever loads, standard TensorRT first).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dsc import api
from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.backends.tensorrt import RTX_TARGET_SMS, BuildOptions, ShapeEnvelope, build_engine
from dsc.errors import DscError, Unsupported

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
ENVELOPE = ShapeEnvelope(max_batch=4, max_input_len=64, max_kv=128, max_num_tokens=256)
PROFILE = "gpu-check"


def _runtime():
    """(flavour, RuntimeApi) of the first runtime that loads with a GPU, or skip with why."""
    from dsc.runtime.engine import load_runtime

    wanted = os.environ.get("DSC_GPU_RUNTIME")
    reasons = []
    for flavour in [wanted] if wanted else ["tensorrt", "tensorrt_rtx"]:
        try:
            return flavour, load_runtime(flavour)
        except DscError as e:
            reasons.append(str(e))
    pytest.skip("no GPU engine runtime here: " + " | ".join(reasons))


@pytest.fixture(scope="module")
def gpu_artifact(tmp_path_factory):
    from dsc.runtime.records import record_engine

    flavour, rt = _runtime()
    sm = rt.device.compute_capability()
    if flavour == "tensorrt_rtx" and sm not in RTX_TARGET_SMS:
        pytest.skip(f"TensorRT-RTX cannot target this device's SM{sm}")
    out = tmp_path_factory.mktemp("gpu") / "v3-fp16"
    api.export(
        REPO / "examples/models/tiny-deepseek-v3", out, dtype="fp16", progress=lambda m: None
    )
    io = OrtCausalLM.from_artifact(out).io
    rel = f"engines/{PROFILE}/model.engine"
    (out / rel).parent.mkdir(parents=True)
    res = build_engine(
        out / io["onnx"],
        ENVELOPE,
        BuildOptions(target_sm=sm if flavour == "tensorrt_rtx" else None),
        backend=flavour,
        io_spec=io,
        engine_path=out / rel,
    )
    record_engine(
        out,
        PROFILE,
        rel,
        ENVELOPE,
        backend=flavour,
        trt_version=res.trt_version,
        sm=sm,
        runtime=rt.label,
        build_seconds=res.build_seconds,
        profile_name="h100",
    )
    return out, flavour


def _runner(art, **kw):
    from dsc.runtime.engine import EngineCausalLM

    return EngineCausalLM.from_artifact(art[0], PROFILE, runtime=art[1], **kw)


def _chain(r, steps=6, seed=0):
    ids = np.random.default_rng(seed).integers(3, 200, size=(2, 12))
    mask, pos = np.ones_like(ids), np.broadcast_to(np.arange(12), ids.shape).copy()
    out = r.step(ids, mask, pos, r.empty_past(2))
    logits = [out.logits.astype(np.float32)]
    for k in range(steps):
        tok = out.logits[:, -1].argmax(-1)[:, None]
        out = r.step(tok, np.ones((2, 13 + k), np.int64), np.full((2, 1), 12 + k), out.present)
        logits.append(out.logits.astype(np.float32))
    return logits


def test_gpu_engine_logits_match_onnxruntime(gpu_artifact):
    ort = OrtCausalLM.from_artifact(gpu_artifact[0])
    want = _chain(ort)
    got = _chain(_runner(gpu_artifact, cuda_graphs=False))
    for a, b in zip(want, got, strict=False):
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.999
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95


def test_gpu_cuda_graph_replay_equals_eager(gpu_artifact):
    eager = _chain(_runner(gpu_artifact, cuda_graphs=False))
    r = _runner(gpu_artifact)
    runs = [_chain(r) for _ in range(3)]
    if r.runtime.native_graphs:
        # TensorRT-RTX captures by itself; its shape-specialized kernels (compiled at run time)
        # may round differently from the first run's fallback kernels
        assert r.graph_stats.native_graph_steps == 21 and r.graph_stats.graph_captures == 0
        for a, b in zip(eager, runs[2], strict=False):
            assert (a.argmax(-1) == b.argmax(-1)).all()
            np.testing.assert_allclose(a, b, atol=2e-2)
        return
    assert r.graph_stats.graph_captures == 6 and r.graph_stats.graph_replays == 6
    for a, b in zip(eager, runs[2], strict=False):
        np.testing.assert_array_equal(a, b)


def test_gpu_validate_engine_passes(gpu_artifact):
    from dsc.runtime.evaluate import validate_engine
    from dsc.validate.gate import GateOptions

    r = validate_engine(
        gpu_artifact[0],
        PROFILE,
        runtime=gpu_artifact[1],
        options=GateOptions(window=64, windows=4, prompts=2, gen_len=8),
    )
    assert r["passed"], r["failures"]


def test_gpu_bench_engine(gpu_artifact):
    from dsc.runtime.evaluate import bench_engine

    r = bench_engine(
        gpu_artifact[0],
        PROFILE,
        runtime=gpu_artifact[1],
        batches=(1, 4),
        prompt_lens=(32,),
        gen_len=16,
        repeats=3,
    )
    s = r["runs"][0]["graph_stats"]
    assert s["graph_replays"] > 0 or s["native_graph_steps"] > 0
    for run in r["runs"]:
        for row in run["rows"]:
            assert row["decode_tokens_per_s"] > 0 and 0 < row["fraction_of_roofline"] < 2


def test_gpu_engine_of_another_version_is_refused(gpu_artifact, tmp_path):
    import shutil

    from dsc.runtime.records import record_engine

    other = tmp_path / "other"
    shutil.copytree(gpu_artifact[0], other)
    record_engine(
        other,
        PROFILE,
        f"engines/{PROFILE}/model.engine",
        ENVELOPE,
        backend=gpu_artifact[1],
        trt_version="0.0.1",
        sm=75,
        runtime="x",
    )
    with pytest.raises(Unsupported, match=r"0\.0\.1"):
        _runner((other, gpu_artifact[1]))
