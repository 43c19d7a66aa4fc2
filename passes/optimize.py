"""`dsc optimize`: run the pass pipeline on an artifact's graph and write a new artifact.

The new artifact is the input's files with model.onnx (+ .data) replaced, model_io.json's
opset updated (names, dtypes and ranks of the graph's inputs and outputs must not change; a
pass that changed them is a bug and fails the run), `passes_report.json` (per pass: seconds,
node counts, counts per rule, verify results; the coverage record) and manifest.json with a
`stages.optimize` record, the new `graph` record and every output's sha256. Written
atomically (dsc.artifacts.atomic_dir): a failure leaves the destination as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_ir as ir
from dsc.passes._framework import PassContext, PassOptions, PipelineReport
from dsc.passes._pipeline import build_pipeline, run_pipeline

from dsc.artifacts import (
    IO_SPEC,
    MANIFEST,
    atomic_dir,
    check_output,
    load_io_spec,
    data_file,
    load_manifest,
    write_graph,
    write_json,
)
from dsc.errors import BadInput

logger = logging.getLogger(__name__)

REPORT_FILE = "passes_report.json"


@dataclass
class OptimizeResult:
    path: Path
    report: PipelineReport
    coverage: dict
    seconds: float


def optimize_model(model: ir.Model, ctx: PassContext, *, config: dict | None = None,
                   only=None, disable=(), dump_after=(), dump_dir: Path | None = None,
                   verify_each: bool = False, progress=None) -> tuple[PipelineReport, dict]:
    """Run the pipeline in place; return its report and the coverage of the result."""
    from dsc.passes.coverage import coverage

    report = run_pipeline(model, ctx, only=only, disable=disable, dump_after=dump_after,
                          dump_dir=dump_dir, verify_each=verify_each, progress=progress)
    return report, coverage(model, config, target=ctx.target)


def _signature(model: ir.Model) -> list:
    def sig(values):
        return [(v.name, str(v.dtype), None if v.shape is None else len(v.shape)) for v in values]

    return [sig(model.graph.inputs), sig(model.graph.outputs)]


def _tools() -> dict:
    from dsc.manifest import tool_versions

    return tool_versions(("onnx", "onnxscript", "onnx-ir", "onnxruntime"))


def optimize_in_place(directory: Path, ctx: PassContext, *, only=None, disable=(),
                      dump_after=(), verify_each: bool = False,
                      progress=None) -> tuple[PipelineReport, dict]:
    """Optimize the graph of the artifact being written at `directory`, in place.

    Replaces model.onnx (+ .data), updates model_io.json's opset and writes passes_report.json.
    Returns the pipeline report and the record passes_report.json holds. Used by `dsc optimize` (on a
    copy of its input) and by `dsc build` (stage 2).
    """
    directory = Path(directory)
    io = load_io_spec(directory, check_manifest=False)
    names = [n for n, _ in build_pipeline(ctx, only, disable)]  # validates the names early
    config = None
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
    onnx_name = io["onnx"]
    model = ir.load(directory / onnx_name)
    before = _signature(model)
    report, cov = optimize_model(model, ctx, config=config, only=only, disable=disable,
                                 dump_after=dump_after, dump_dir=directory / "dumps",
                                 verify_each=verify_each, progress=progress)
    if _signature(model) != before:
        raise RuntimeError("a pass changed the graph's inputs or outputs (a dsc bug)")
    if progress:
        progress(f"writing {onnx_name}")
    opset = model.opset_imports.get("", io.get("opset"))
    # Weights stay external when the input graph's were (--external-data, or over 1.5 GiB).
    write_graph(model, directory, onnx_name,
                external=True if (directory / data_file(onnx_name)).exists() else None)
    del model  # its lazy tensors now point at the new data file
    io = dict(io, opset=opset)
    write_json(directory / IO_SPEC, io)
    record = {"target": ctx.target.to_json(),
              "profile": getattr(ctx.profile, "name", None),
              "options": asdict(ctx.options), "passes": names,
              "report": report.to_json(), "coverage": cov}
    write_json(directory / REPORT_FILE, record)
    return report, record


def stage_summary(record: dict) -> dict:
    """The manifest's short form of a passes_report.json record."""
    rep = record["report"]
    return {"report": REPORT_FILE, "nodes_before": rep["nodes_before"],
            "nodes_after": rep["nodes_after"], "counts": rep["counts"],
            "coverage": {k: {"fused": e["fused"] + e["kept"], "blocks": e["blocks"]}
                         for k, e in record["coverage"]["kinds"].items()}}


def optimize_artifact(artifact: str | Path, output: str | Path, *, profile=None,
                      options: PassOptions | None = None, only=None, disable=(),
                      dump_after=(), verify_each: bool = False, force: bool = False,
                      progress=None) -> OptimizeResult:
    """Optimize `artifact` into a new artifact at `output` (see the module docstring)."""
    from dsc.manifest import canonical_hash, graph_record, hash_tree, write_derived_manifest

    artifact, output = Path(artifact), Path(output)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    if artifact.resolve() == output.resolve():
        raise BadInput("dsc optimize writes a new artifact; choose an output other than the input")
    check_output(output, force=force)
    ctx = PassContext(profile, options or PassOptions())
    names = [n for n, _ in build_pipeline(ctx, only, disable)]  # validates the names early
    onnx_name = io["onnx"]
    t0 = time.perf_counter()
    with atomic_dir(output, force=force) as tmp:
        skip = {MANIFEST, REPORT_FILE}
        for f in sorted(artifact.iterdir()):
            if f.is_file() and f.name not in skip:
                shutil.copy2(f, tmp / f.name)
        report, record = optimize_in_place(tmp, ctx, only=only, disable=disable,
                                   dump_after=dump_after, verify_each=verify_each,
                                   progress=progress)
        io = load_io_spec(tmp, check_manifest=False)
        seconds = time.perf_counter() - t0
        inputs = {"graph": manifest.get("graph", {}).get("hash")
                  or graph_record(artifact, load_io_spec(artifact))["hash"],
                  "passes": names, "options": asdict(ctx.options),
                  "profile": getattr(profile, "name", None), "tools": _tools()}
        outputs = hash_tree(tmp)
        stages = dict(manifest.get("stages", {}))
        stages["optimize"] = {
            "status": "ran", "input_hash": canonical_hash(inputs), "inputs": inputs,
            "outputs": {k: outputs[k] for k in (onnx_name, f"{onnx_name}.data", IO_SPEC,
                                                REPORT_FILE) if k in outputs},
            "seconds": round(seconds, 2), **stage_summary(record),
        }
        new = dict(manifest, stages=stages, graph=graph_record(tmp, io), outputs=outputs)
        write_derived_manifest(tmp, new, manifest, artifact)
    return OptimizeResult(output, report, record["coverage"], seconds)
