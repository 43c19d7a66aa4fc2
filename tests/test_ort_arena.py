"""OrtCausalLM's CPU memory arena: on for small graphs, off for large ones (by weight bytes)."""

from __future__ import annotations

from dsc.artifacts import load_io_spec
from dsc.backends.onnxruntime import runner


def _arena(artifact, **kw) -> bool:
    io = load_io_spec(artifact)
    lm = runner.OrtCausalLM(artifact / io["onnx"], io, **kw)
    return bool(lm.session.get_session_options().enable_cpu_mem_arena)


def test_arena_follows_the_weight_size(exported, monkeypatch):
    artifact = exported["qwen2"]
    size = runner.graph_weight_bytes(artifact / "model.onnx")
    assert 10_000 < size < runner.ARENA_MAX_WEIGHT_BYTES
    assert _arena(artifact) is True
    monkeypatch.setattr(runner, "ARENA_MAX_WEIGHT_BYTES", size - 1)
    assert _arena(artifact) is False
    assert _arena(artifact, arena=True) is True  # an explicit choice wins
