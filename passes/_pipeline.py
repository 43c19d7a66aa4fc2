"""Build and run pass pipelines: `build_pipeline`, `run_pipeline`, `get_pass`, `list_passes`.

`build_pipeline(ctx, only=..., disable=...)` instantiates the registered passes in `PIPELINE`
order. `run_pipeline` runs a pipeline on a model and returns a `PipelineReport`: per pass its
time, node count before/after, `modified`, and the counts the pass reports (fusions applied per
rule); optionally it saves the graph after named passes (`dump_after`) and runs ONNX Runtime
after every pass against the previous result (`verify_each`), failing with the name of the pass
that changed the outputs. The first lookup imports every pass module, which registers it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import onnx_ir as ir

from dsc.artifacts import EXTERNAL_DATA_THRESHOLD, weight_bytes
from dsc.errors import BadInput
from dsc.passes._framework import (
    _REGISTRY,
    PIPELINE,
    PassContext,
    PassInfo,
    PassRecord,
    PipelineReport,
    count_nodes,
)
from dsc.passes._ir import reset_unique_names

logger = logging.getLogger(__name__)


def _ensure_loaded() -> None:
    # The pass modules register themselves on import; imported here, on first use, so that
    # `import dsc.passes` stays light (onnxscript's rewriter loads only when a pass is built).
    import dsc.passes.cleanup
    import dsc.passes.fusion
    import dsc.passes.precision  # noqa: F401


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise BadInput(f"unknown pass {name!r} (known: {known})") from None


def list_passes() -> list[PassInfo]:
    """Registered passes, in pipeline order first, then any others by name."""
    _ensure_loaded()
    order = list(dict.fromkeys(PIPELINE))
    rest = sorted(n for n in _REGISTRY if n not in order)
    return [_REGISTRY[n] for n in order + rest if n in _REGISTRY]


def build_pipeline(
    ctx: PassContext, only: Sequence[str] | None = None, disable: Iterable[str] = ()
) -> list[tuple[str, ir.passes.PassBase]]:
    """The passes to run, as (name, pass): `only` in its given order, else `PIPELINE`."""
    disable = set(disable)
    for name in disable:
        get_pass(name)
    names = list(only) if only else list(PIPELINE)
    return [(n, get_pass(n).factory(ctx)) for n in names if n not in disable]


def run_pipeline(
    model: ir.Model,
    ctx: PassContext | None = None,
    *,
    only: Sequence[str] | None = None,
    disable: Iterable[str] = (),
    passes: Sequence[tuple[str, ir.passes.PassBase]] | None = None,
    dump_after: Iterable[str] = (),
    dump_dir: Path | None = None,
    verify_each: bool = False,
    verify_atol: float = 1e-4,
    progress: Callable[[str], None] | None = None,
) -> PipelineReport:
    """Run the pipeline in place on `model`; return the report.

    `verify_each` runs ONNX Runtime on fixed small inputs (a prefill and a decode step) before
    the first pass and after every pass that modified the graph, and raises `CheckFailed`
    naming the first pass whose outputs differ from the previous graph's by more than
    `verify_atol` (absolute, scaled by the outputs' magnitude when that exceeds 1).
    """
    ctx = ctx or PassContext()
    reset_unique_names()
    pipeline = list(passes) if passes is not None else build_pipeline(ctx, only, disable)
    dump_after = set(dump_after)
    unknown = dump_after - {n for n, _ in pipeline}
    if unknown:
        raise BadInput(
            f"--dump-after names passes not in this pipeline: {', '.join(sorted(unknown))}"
        )
    if dump_after and dump_dir is None:
        raise BadInput("dump_after needs a dump directory")
    report = PipelineReport(target=ctx.target.name, nodes_before=count_nodes(model))
    verifier = None
    if verify_each:
        from dsc.passes._verify import Verifier

        verifier = Verifier(model, atol=verify_atol)
    start = time.perf_counter()
    for index, (name, p) in enumerate(pipeline):
        if progress:
            progress(f"pass {index + 1}/{len(pipeline)}: {name}")
        before = count_nodes(model)
        t0 = time.perf_counter()
        result = p(model)
        seconds = time.perf_counter() - t0
        if result.model is not model:
            raise RuntimeError(f"pass {name} returned a new model; dsc passes work in place")
        record = PassRecord(
            name,
            seconds,
            before,
            count_nodes(model),
            bool(result.modified),
            dict(getattr(p, "counts", {}) or {}),
            list(getattr(p, "notes", []) or []),
        )
        if verifier is not None and result.modified:
            record.verify_max_abs = verifier.check(model, name)
        report.passes.append(record)
        logger.info(
            "%s: %.3fs, %d -> %d nodes%s",
            name,
            seconds,
            before,
            record.nodes_after,
            f" {record.counts}" if record.counts else "",
        )
        if name in dump_after:
            path = Path(dump_dir) / f"after-{index:02d}-{name}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            # A dump carries its own weights: references to the artifact's data file would
            # not resolve from dumps/ (and that file is rewritten when the stage ends).
            external = weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD or any(
                isinstance(v.const_value, ir.ExternalTensor)
                for v in model.graph.initializers.values()
            )
            ir.save(model, path, external_data=f"{path.name}.data" if external else None)
            report.dumps.append(str(path))
    report.seconds = time.perf_counter() - start
    report.nodes_after = count_nodes(model)
    return report
