"""The builder's scratch and the workspace pool: the prefill batch is lowered until it fits.

Measured with TensorRT-RTX 1.7 at R1-Distill-Qwen-1.5B size (docs/BENCHMARKS.md): the compiler
backend takes a fused region's scratch from the WORKSPACE pool, about 240 KB per prefill token,
so 8 x 4,096 tokens asked for 7.85 GB of a 4 GB pool. These tests drive the retry with a
stand-in builder that fails the same way above a token count.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dsc.backends.tensorrt import BuildOptions, ShapeEnvelope, WorkspaceTooSmall
from dsc.pipeline import engines
from dsc.pipeline.progress import Progress

PER_TOKEN = 240_000  # bytes of scratch per prefill token (measured, see module doc)


def _fake_builder(calls: list):
    def build(onnx_path, env, options, **kwargs):
        calls.append(env)
        asked = env.max_prefill_batch * env.max_input_len * PER_TOKEN
        pool = options.workspace_mib << 20
        if asked > pool:
            raise WorkspaceTooSmall("no room", asked, pool)
        return "built"

    return build


def test_prefill_batch_lowered_until_scratch_fits(monkeypatch):
    calls: list[ShapeEnvelope] = []
    monkeypatch.setattr(engines, "build_engine", _fake_builder(calls))
    env = ShapeEnvelope(8, 4096, 16384, max_num_tokens=32768)  # jetson-orin before the budget
    opts = BuildOptions(workspace_mib=4096)
    result, built, _ = engines.build_within_workspace(
        Path("m.onnx"), env, opts, Progress(1, quiet=True), "[t]"
    )
    assert result == "built"
    # 8 x 4096 x 240 KB = 7.9 GB > 4 GiB -> 8 x 4.29/7.86 x 0.9 = 3 sequences: 2.9 GB fits.
    assert [c.max_prefill_batch for c in calls] == [8, 3]
    assert built.max_num_tokens == 3 * 4096 and built.max_batch == 8 and built.max_kv == 16384
    assert built.max_prefill_batch * 4096 * PER_TOKEN <= 4096 << 20


def test_one_sequence_that_does_not_fit_is_refused(monkeypatch):
    calls: list[ShapeEnvelope] = []
    monkeypatch.setattr(engines, "build_engine", _fake_builder(calls))
    env = ShapeEnvelope(4, 8192, 32768, max_num_tokens=8192)  # prefill batch 1 already
    with pytest.raises(WorkspaceTooSmall):
        engines.build_within_workspace(
            Path("m.onnx"), env, BuildOptions(workspace_mib=1024), Progress(1, quiet=True), "[t]"
        )
    assert len(calls) == 1


def test_unlimited_workspace_is_not_retried(monkeypatch):
    def build(onnx_path, env, options, **kwargs):
        raise WorkspaceTooSmall("host out of memory", 10 << 30, None)

    monkeypatch.setattr(engines, "build_engine", build)
    with pytest.raises(WorkspaceTooSmall):
        engines.build_within_workspace(
            Path("m.onnx"), ShapeEnvelope(8, 16, 64), BuildOptions(), Progress(1, quiet=True), "[t]"
        )


def test_builder_message_names_the_pool_and_the_fix():
    from dsc.backends.tensorrt.builder import LogRecord, _classify_build_failure

    rec = LogRecord(
        "ERROR",
        "[localCheckMacros.cpp::getErrorStr::132] Error Code 2: "
        "OutOfMemory (Requested size was 4423680000 bytes.)",
    )
    err = _classify_build_failure([rec], "build for SM75", 1 << 30)
    assert isinstance(err, WorkspaceTooSmall) and err.exit_code == 7
    assert err.requested_bytes == 4423680000 and err.workspace_bytes == 1 << 30
    assert "(workspace pool 1.00 GiB)" in str(err)
    assert "--set builder.workspace_gb=5" in str(err)


def test_workspace_raised_within_the_plan_margin_when_one_sequence_needs_more(monkeypatch):
    """V2-Lite's MoE at one 2,048-token prefill asked T4's 1 GiB pool for 1.03 GiB."""
    calls: list[tuple[int, int]] = []

    def build(onnx_path, env, options, **kwargs):
        calls.append((env.max_prefill_batch, options.workspace_mib))
        asked = env.max_prefill_batch * 2048 * 270_000 * 2  # 64 experts x 1,408 x 3, fp16
        if asked > options.workspace_mib << 20:
            raise WorkspaceTooSmall("no room", asked, options.workspace_mib << 20)
        return "built"

    monkeypatch.setattr(engines, "build_engine", build)
    env = ShapeEnvelope(8, 2048, 8192, max_num_tokens=8192)
    opts = BuildOptions(workspace_mib=1024)
    _, built, used = engines.build_within_workspace(
        Path("m.onnx"),
        env,
        opts,
        Progress(1, quiet=True),
        "[t]",
        max_workspace_bytes=(1 << 30) + (8 << 30),
    )
    assert calls == [(4, 1024), (1, 1024), (1, 2048)]
    assert built.max_prefill_batch == 1 and used.workspace_mib == 2048
    notes = engines._changes(env, built, opts, used)
    assert "prefill batch lowered from 4 to 1" in notes[0]
    assert "workspace raised from 1 to 2 GiB" in notes[1]
    # Without room in the plan (or a user-set pool: ceiling None) it is refused.
    calls.clear()
    with pytest.raises(WorkspaceTooSmall):
        engines.build_within_workspace(
            Path("m.onnx"), env, opts, Progress(1, quiet=True), "[t]", max_workspace_bytes=None
        )
