"""Run the pass pipeline on the graph of an artifact directory, in place.

model.onnx (+ .data) is replaced and model_io.json's opset updated (names, dtypes and ranks of
the graph's inputs and outputs must not change; a pass that changed them is a bug and fails the
run), and `passes_report.json` is written (per pass: seconds, node counts, counts per rule,
verify results; the coverage record). The optimize stage (`dsc.stages.optimize`) calls this for
`dsc build` and `dsc optimize`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import onnx_ir as ir

from dsc.artifacts import (
    IO_SPEC,
    data_file,
    load_io_spec,
    write_graph,
    write_json,
)
from dsc.passes._framework import PassContext, PipelineReport
from dsc.passes._pipeline import build_pipeline, run_pipeline

REPORT_FILE = "passes_report.json"


def optimize_model(
    model: ir.Model,
    ctx: PassContext,
    *,
    config: dict | None = None,
    only=None,
    disable=(),
    dump_after=(),
    dump_dir: Path | None = None,
    verify_each: bool = False,
    progress=None,
) -> tuple[PipelineReport, dict]:
    """Run the pipeline in place; return its report and the coverage of the result."""
    from dsc.passes.coverage import coverage

    report = run_pipeline(
        model,
        ctx,
        only=only,
        disable=disable,
        dump_after=dump_after,
        dump_dir=dump_dir,
        verify_each=verify_each,
        progress=progress,
    )
    return report, coverage(model, config, target=ctx.target)


def _signature(model: ir.Model) -> list:
    def sig(values):
        return [(v.name, str(v.dtype), None if v.shape is None else len(v.shape)) for v in values]

    return [sig(model.graph.inputs), sig(model.graph.outputs)]


def optimize_in_place(
    directory: Path,
    ctx: PassContext,
    *,
    only=None,
    disable=(),
    dump_after=(),
    verify_each: bool = False,
    progress=None,
    weights_dir: Path | None = None,
) -> tuple[PipelineReport, dict]:
    """Optimize the graph of the artifact being written at `directory`, in place.

    Replaces model.onnx (+ .data), updates model_io.json's opset and writes passes_report.json.
    Returns the pipeline report and the record passes_report.json holds. Used by the optimize
    stage (`dsc.stages.optimize`: `dsc optimize` on a copy of its input, `dsc build` stage 2).

    `weights_dir`: the directory holding the input graph's external data file when it is not
    beside the graph (`dsc optimize` reads its input's weights where they are instead of
    copying them: 31 GB at DeepSeek-V2-Lite). None: in `directory`.
    """
    directory = Path(directory)
    io = load_io_spec(directory, check_manifest=False)
    names = [n for n, _ in build_pipeline(ctx, only, disable)]  # validates the names early
    config = None
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
    onnx_name = io["onnx"]
    model = ir.load(directory / onnx_name)
    weights = directory if weights_dir is None else Path(weights_dir)
    if weights_dir is not None:
        ir.external_data.set_base_dir(model.graph, weights)
    before = _signature(model)
    report, cov = optimize_model(
        model,
        ctx,
        config=config,
        only=only,
        disable=disable,
        dump_after=dump_after,
        dump_dir=directory / "dumps",
        verify_each=verify_each,
        progress=progress,
    )
    if _signature(model) != before:
        raise RuntimeError("a pass changed the graph's inputs or outputs (a dsc bug)")
    if progress:
        progress(f"writing {onnx_name}")
    opset = model.opset_imports.get("", io.get("opset"))
    # Weights stay external when the input graph's were (--external-data, or over 1.5 GiB).
    write_graph(
        model,
        directory,
        onnx_name,
        external=True if (weights / data_file(onnx_name)).exists() else None,
    )
    del model  # its lazy tensors now point at the new data file
    io = dict(io, opset=opset)
    write_json(directory / IO_SPEC, io)
    record = {
        "target": ctx.target.to_json(),
        "profile": getattr(ctx.profile, "name", None),
        "options": asdict(ctx.options),
        "passes": names,
        "report": report.to_json(),
        "coverage": cov,
    }
    write_json(directory / REPORT_FILE, record)
    return report, record


def stage_summary(record: dict) -> dict:
    """The manifest's short form of a passes_report.json record."""
    rep = record["report"]
    return {
        "report": REPORT_FILE,
        "nodes_before": rep["nodes_before"],
        "nodes_after": rep["nodes_after"],
        "counts": rep["counts"],
        "coverage": {
            k: {"fused": e["fused"] + e["kept"], "blocks": e["blocks"]}
            for k, e in record["coverage"]["kinds"].items()
        },
    }
