"""Stage 2, optimize: the graph passes (`dsc.passes`) on the exported graph, in place.

Inputs: the upstream stage's input hash (the exporter and the passes are deterministic, so
equal upstream inputs mean the same graph), the pass names, the pass options, the target's op
set and the pass tool versions. Run by `dsc build` and by `dsc optimize` (which writes a new
artifact: the input's files, the optimized graph, `passes_report.json` and a manifest with a
`stages.optimize` record, written atomically).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dsc.artifacts import (
    IO_SPEC,
    MANIFEST,
    atomic_dir,
    check_output,
    data_file,
    load_io_spec,
    load_manifest,
)
from dsc.errors import BadInput
from dsc.pipeline.progress import peak_rss_bytes, reset_peak_rss
from dsc.stages._base import Stage, StageRecord

TOOLS = ("dsc", "onnx", "onnxscript", "onnx-ir")


def pass_context(targets):
    """The pass context for the graph every target of this build compiles.

    One graph serves every profile, so fused ops are those all targets parse: the target's own
    op set when the targets agree, else the portable one (ops every supported TensorRT parses).
    """
    from dsc.passes import PassContext, PassOptions, target_ops

    # Compare what the targets parse, not their names (two TensorRT versions may agree).
    ops = {
        json.dumps(
            {k: v for k, v in target_ops(t.profile).to_json().items() if k != "name"},
            sort_keys=True,
        )
        for t in targets
    }
    if len(ops) == 1:
        return PassContext(targets[0].profile, PassOptions())
    half = any(not target_ops(t.profile).fp32_gemm for t in targets)
    return PassContext(None, PassOptions(target_ops="portable", half_fp32_gemm=half))


def upstream_hash(manifest: dict) -> str | None:
    """The input hash of the stage that wrote an artifact's graph (quantize, optimize, export)."""
    stages = manifest.get("stages") or {}
    for name in ("quantize", "optimize", "export"):
        st = stages.get(name) or {}
        if st.get("status") in ("ran", "reused") and st.get("input_hash"):
            return st["input_hash"]
    return None


class OptimizeStage(Stage):
    name = "optimize"
    index = 2

    def inputs(self, upstream: str, ctx, tools: dict, *, only=None, disable=()) -> dict:
        """The stage's inputs; raises `BadInput` for an unknown pass name (before any work)."""
        from dsc.passes import build_pipeline

        names = [n for n, _ in build_pipeline(ctx, only or None, disable)]
        return {
            "upstream": upstream,
            "passes": names,
            "options": asdict(ctx.options),
            "target": ctx.target.to_json(),
            "tools": {k: tools.get(k) for k in TOOLS},
        }

    def run(
        self,
        directory: Path,
        inputs: dict,
        ctx,
        *,
        only=None,
        disable=(),
        dump_after=(),
        verify_each: bool = False,
        progress=None,
        weights_dir: Path | None = None,
    ) -> tuple[StageRecord, object, dict]:
        """Optimize the graph in `directory`; returns (record, PipelineReport, report record).
        `weights_dir`: where its external data file is when not beside it
        (`dsc.passes.optimize.optimize_in_place`)."""
        from dsc.passes.optimize import optimize_in_place, stage_summary

        t0 = time.perf_counter()
        reset_peak_rss()
        report, record = optimize_in_place(
            directory,
            ctx,
            only=only or None,
            disable=disable,
            dump_after=dump_after,
            verify_each=verify_each,
            progress=progress,
            weights_dir=weights_dir,
        )
        seconds = time.perf_counter() - t0
        rec = StageRecord(
            "ran",
            self.input_hash(inputs),
            inputs,
            {},
            round(seconds, 2),
            peak_rss_bytes(),
            extra=stage_summary(record),
        )
        return rec, report, record


@dataclass
class OptimizeResult:
    """What `dsc optimize` wrote: the artifact, the pipeline report, coverage, seconds."""

    path: Path
    report: object  # dsc.passes.PipelineReport
    coverage: dict
    seconds: float


def optimize_artifact(
    artifact: str | Path,
    output: str | Path,
    *,
    profile=None,
    options=None,
    only=None,
    disable=(),
    dump_after=(),
    verify_each: bool = False,
    force: bool = False,
    progress=None,
) -> OptimizeResult:
    """`dsc optimize`: the optimize stage on `artifact`'s graph, into a new artifact `output`.

    `profile`: a loaded `HardwareProfile` (None: only ops every supported TensorRT parses).
    Raises `BadInput` (exit 3) for an unknown pass or when `output` is the input,
    `OutputConflict` for an occupied output without `force`."""
    from dsc.manifest import graph_record, hash_tree, tool_versions, write_derived_manifest
    from dsc.passes import PassContext, PassOptions
    from dsc.passes.optimize import REPORT_FILE

    artifact, output = Path(artifact), Path(output)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    if artifact.resolve() == output.resolve():
        raise BadInput("dsc optimize writes a new artifact; choose an output other than the input")
    check_output(output, force=force)
    ctx = PassContext(profile, options or PassOptions())
    stage = OptimizeStage()
    upstream = (
        upstream_hash(manifest)
        or (manifest.get("graph") or {}).get("hash")
        or graph_record(artifact, io)["hash"]
    )
    inputs = stage.inputs(
        upstream, ctx, tool_versions(("onnx", "onnxscript", "onnx-ir")), only=only, disable=disable
    )
    onnx_name = io["onnx"]
    t0 = time.perf_counter()
    with atomic_dir(output, force=force) as tmp:
        # The weights are read where they are, not copied first: the passes write a new data
        # file anyway, and a copy would hold the input's bytes on disk a third time (31 GB at
        # DeepSeek-V2-Lite: input, copy and output did not fit in 80 GB).
        for f in sorted(artifact.iterdir()):
            if f.is_file() and f.name not in (MANIFEST, REPORT_FILE, data_file(onnx_name)):
                shutil.copy2(f, tmp / f.name)
        rec, report, record = stage.run(
            tmp,
            inputs,
            ctx,
            only=only,
            disable=disable,
            dump_after=dump_after,
            verify_each=verify_each,
            progress=progress,
            weights_dir=artifact,
        )
        outputs = hash_tree(tmp)
        rec.outputs = {
            k: outputs[k]
            for k in (onnx_name, f"{onnx_name}.data", IO_SPEC, REPORT_FILE)
            if k in outputs
        }
        stages = dict(manifest.get("stages", {}), optimize=rec.to_json())
        new = dict(
            manifest,
            stages=stages,
            graph=graph_record(tmp, load_io_spec(tmp, check_manifest=False), outputs),
            outputs=outputs,
        )
        write_derived_manifest(tmp, new, manifest, artifact)
    return OptimizeResult(output, report, record["coverage"], time.perf_counter() - t0)
