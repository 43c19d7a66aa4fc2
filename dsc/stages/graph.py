"""The graph stages of `dsc build` together: export, optimize, quantize into one directory.

They rewrite model.onnx in place, so they are reused together or not at all; each file of the
artifact belongs to the last of them that wrote it.
"""

from __future__ import annotations

from pathlib import Path

from dsc.artifacts import IO_SPEC
from dsc.manifest import hash_tree
from dsc.stages._base import StageRecord, files, link, reused

NOT_RUN = {"optimize": "--no-optimize", "quantize": "no quantization requested"}


def graph_inputs(stages, config, info, ctx, tools: dict) -> dict[str, dict | None]:
    """Inputs of export, optimize and quantize (None: the stage is not requested); each later
    stage's inputs name the previous one's input hash. `stages`: (export, optimize, quantize)."""
    export, optimize, quantize = stages
    plan: dict[str, dict | None] = {
        "export": export.inputs(
            info,
            dtype=config.dtype,
            opset=config.opset,
            tools=tools,
            external_data=config.external_data,
            stream=config.stream,
            trace_layers=config.trace_layers,
        )
    }
    upstream = export.input_hash(plan["export"])
    plan["optimize"] = (
        optimize.inputs(upstream, ctx, tools, only=config.passes, disable=config.disable_passes)
        if config.optimize
        else None
    )
    if plan["optimize"] is not None:
        upstream = optimize.input_hash(plan["optimize"])
    plan["quantize"] = (
        quantize.inputs(
            upstream,
            tools,
            config.quantize,
            weight_only=config.weight_only,
            method=config.calib_method,
            alpha=config.alpha,
            samples=config.calib_samples,
            seq_len=config.calib_seq_len,
            calibrate_by=config.calibrate_by,
            exclude=config.exclude,
            calib=config.calib,
            lm_head=config.quantize_lm_head,
            embedding=config.quantize_embedding,
        )
        if config.quantize
        else None
    )
    return plan


def run_graph_stages(stages, config, info, ctx, tmp: Path, plan: dict, progress, ran: dict) -> dict:
    """Export, then optimize and quantize in place; returns the stage records (as JSON)."""
    export, optimize, quantize = stages
    records, written = {}, {}
    progress.say(f"{export.line(progress, f'{info.architecture} -> ONNX {config.dtype}')} ...")
    records["export"], g = export.run(
        info, tmp, plan["export"], progress=progress.sub, quiet=progress.quiet
    )
    written["export"] = files(tmp)
    # A later stage rewrites these in place (same names); everything else it writes is new.
    rewritten = {g.onnx_path.name, f"{g.onnx_path.name}.data", IO_SPEC}
    progress.say(
        f"{export.line(progress, '')}{g.onnx_path.name} written, {records['export'].seconds:.1f}s"
    )
    ran["export"] = True
    for stage in (optimize, quantize):
        inputs = plan[stage.name]
        if inputs is None:
            records[stage.name] = _not_run(stage, progress)
            continue
        before = files(tmp)
        if stage is optimize:
            progress.say(f"{stage.line(progress, f'graph passes for {ctx.target.name}')} ...")
            rec, report, _ = stage.run(
                tmp, inputs, ctx, only=config.passes, disable=config.disable_passes
            )
            for p in report.passes:
                progress.detail(
                    f"pass {p.name}: {p.seconds * 1e3:.1f} ms, nodes "
                    f"{p.nodes_before} -> {p.nodes_after}" + (f", {p.counts}" if p.counts else "")
                )
            cov = ", ".join(
                f"{k} {v['fused']}/{v['blocks']}"
                for k, v in rec.extra["coverage"].items()
                if v["blocks"]
            )
            end = f"nodes {report.nodes_before} -> {report.nodes_after}; fused {cov or 'nothing'}"
        else:
            progress.say(f"{stage.line(progress, inputs['precision'])} ...")
            rec, report = stage.run(
                tmp,
                inputs,
                calib=config.calib,
                alpha=config.alpha,
                lm_head=config.quantize_lm_head,
                embedding=config.quantize_embedding,
                progress=progress.sub,
            )
            x = rec.extra
            if x["under_calibrated_experts"]:
                progress.say(
                    f"warning: {x['under_calibrated_experts']} MoE experts saw fewer "
                    f"than {report['experts']['min_tokens']} calibration tokens "
                    f"(quant_report.json lists them)"
                )
            vocab = ", ".join(
                f"{k} {v['precision']}" for k in ("lm_head", "embedding") if (v := x.get(k))
            )
            end = (
                f"{x['scheme']}: {x['quantized_layers']} layers quantized"
                + (f" (+ {vocab}, weight-only)" if vocab else "")
                + f", {len(report['excluded'])} kept in float"
            )
        written[stage.name] = (files(tmp) - before) | rewritten
        records[stage.name] = rec
        progress.say(f"{stage.line(progress, '')}{end}, {rec.seconds:.1f}s")
        ran[stage.name] = True
    # Each file belongs to the last stage that wrote it.
    final = hash_tree(tmp)
    owner = {rel: name for name in written for rel in sorted(written[name]) if rel in final}
    for rel, name in owner.items():
        records[name].outputs[rel] = final[rel]
    return {k: r.to_json() for k, r in records.items()}


def _not_run(stage, progress) -> StageRecord:
    progress.say(stage.line(progress, f"not run ({NOT_RUN[stage.name]})"))
    return StageRecord.not_run(NOT_RUN[stage.name])


def reuse_graph_stages(
    stages, plan: dict, old_stages: dict, previous: Path, tmp: Path, progress, ran: dict
) -> dict:
    """Link the graph stages' outputs from the previous artifact; returns their records."""
    records = {}
    for stage in stages:
        if plan[stage.name] is None:
            records[stage.name] = _not_run(stage, progress).to_json()
        else:
            rec = old_stages[stage.name]
            records[stage.name] = reused(rec)
            link(previous, tmp, rec["outputs"])
            progress.say(f"{stage.line(progress, '')}reused (inputs unchanged)")
        ran[stage.name] = False
    return records
