"""Shared helpers for the pass tests: run passes on the session's fp32 exports, compare ORT.

`compare_ort` drives the original and the rewritten graph the way dsc runs a model (prefill
with an empty past, then decode steps feeding `present.*` back) and compares logits and every
present tensor at each step. fp32 tolerance: atol 1e-4 (the measured differences are ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.passes import PassContext, PassOptions, run_pipeline

FAMILIES = ("llama", "qwen2", "deepseek_v2", "deepseek_v3")
ATOL = 1e-4
CLEANUP = ["fold-constants", "simplify", "cse", "remove-unused"]


def rtx_ctx(**options) -> PassContext:
    from dsc.hardware import load_profile

    return PassContext(load_profile("rtx-4090"), PassOptions(**options))


def load(artifact: Path) -> ir.Model:
    io = json.loads((Path(artifact) / "model_io.json").read_text())
    return ir.load(Path(artifact) / io["onnx"])


def run(model: ir.Model, names: list[str], ctx: PassContext | None = None):
    return run_pipeline(model, ctx or rtx_ctx(), only=names)


def op_count(model: ir.Model, op_type: str, *, recursive: bool = False) -> int:
    nodes = ir.traversal.RecursiveGraphIterator(model.graph) if recursive else model.graph
    return sum(1 for n in nodes if n.op_type == op_type)


def save(model: ir.Model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path)
    return path


def io_spec(artifact: Path) -> dict:
    return json.loads((Path(artifact) / "model_io.json").read_text())


def _steps(lm: OrtCausalLM, io: dict, batch: int, seq: int, decode: int, pad: int, seed: int):
    rng = np.random.default_rng(seed)
    vocab = io["vocab_size"]
    ids = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), dtype=np.int64)
    if pad:
        mask[0, :pad] = 0  # left padding on the first row
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    out = lm.step(ids, mask, pos, lm.empty_past(batch))
    yield out, mask, mask
    next_pos = pos[:, -1:] + 1
    for _ in range(decode):
        tok = rng.integers(0, vocab, (batch, 1))
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        out = lm.step(tok, mask, next_pos, out.present)
        next_pos = next_pos + 1
        yield out, np.ones((batch, 1), dtype=np.int64), mask


def compare_ort(
    artifact: Path,
    new_onnx: Path,
    *,
    batch: int = 2,
    seq: int = 9,
    decode: int = 3,
    pad: int = 0,
    atol: float = ATOL,
    seed: int = 0,
    padded_rows_free: bool = False,
) -> float:
    """Max abs difference of logits and presents over a prefill and `decode` steps.

    With `pad`, the first row is left-padded by that many tokens. `padded_rows_free` leaves out
    the positions of padding tokens (their logits and cache entries, which no real token ever
    reads): what a fully masked query computes is implementation-defined for a fused attention
    kernel (ONNX Runtime's Attention gives 0, the exported graph a uniform average).
    """
    io = io_spec(artifact)
    ref = OrtCausalLM(Path(artifact) / io["onnx"], io, threads=1)
    new = OrtCausalLM(Path(new_onnx), io, threads=1)
    worst = 0.0
    for step, ((a, qmask, kmask), (b, _, _)) in enumerate(
        zip(
            _steps(ref, io, batch, seq, decode, pad, seed),
            _steps(new, io, batch, seq, decode, pad, seed),
            strict=False,
        )
    ):
        for name, x, y in [
            ("logits", a.logits, b.logits),
            *(
                (f"present[{i}]", p, q)
                for i, (p, q) in enumerate(zip(a.present, b.present, strict=False))
            ),
        ]:
            assert x.shape == y.shape, f"step {step} {name}: shape {y.shape} != {x.shape}"
            assert np.isfinite(y).all(), f"step {step} {name}: not finite"
            if padded_rows_free:
                keep = (qmask if name == "logits" else kmask).astype(bool)
                x, y = (np.moveaxis(v, 1 if name == "logits" else 2, 1) for v in (x, y))
                x, y = x[keep], y[keep]
            diff = float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0
            assert diff <= atol, f"step {step} {name}: max abs difference {diff:.3g} > {atol}"
            worst = max(worst, diff)
    return worst


@pytest.fixture(scope="session")
def optimized(exported, tmp_path_factory):
    """family -> (artifact, optimized model.onnx): the full default pipeline, rtx-4090 target."""
    root = tmp_path_factory.mktemp("optimized")

    class _Lazy(dict):
        def __missing__(self, family):
            model = load(exported[family])
            report = run_pipeline(model, rtx_ctx())
            path = save(model, root / family / "model.onnx")
            self[family] = (exported[family], path, report)
            return self[family]

    return _Lazy()


@pytest.fixture(scope="session")
def prepared(exported, tmp_path_factory):
    """family -> path of the export after cleanup (what every fusion starts from)."""
    root = tmp_path_factory.mktemp("prepared")

    class _Lazy(dict):
        def __missing__(self, family):
            model = load(exported[family])
            run(model, CLEANUP)
            self[family] = save(model, root / family / "model.onnx")
            return self[family]

    return _Lazy()


def check_pass(
    artifact: Path,
    start: Path,
    tmp_path: Path,
    names: list[str],
    ctx: PassContext | None = None,
    *,
    ort: bool = True,
    pad: int = 0,
    padded_rows_free: bool = False,
) -> ir.Model:
    """Run `names` on the graph at `start`: modified, idempotent (a second run of the last pass
    changes nothing), ONNX Runtime equal to the export on prefill and 3 decode steps."""
    ctx = ctx or rtx_ctx()
    model = ir.load(start)
    report = run(model, names, ctx)
    assert report.passes[-1].modified, f"{names[-1]} did not modify the graph"
    again = run(model, [names[-1]], ctx)
    assert not again.passes[0].modified, f"second run of {names[-1]} changed the graph"
    if ort:
        path = save(model, tmp_path / "model.onnx")
        compare_ort(artifact, path, pad=pad, padded_rows_free=padded_rows_free)
    run(model, ["remove-unused"], ctx)
    return model
