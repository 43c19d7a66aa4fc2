"""`dsc build` and `dsc compile`: the pipeline as an ordered tuple of stages, with reuse.

    export → optimize → quantize → compile (one record per hardware profile) → validate

`STAGES` below is the pipeline; each stage (`dsc.stages`) is the object the standalone command
of the same name runs too. Every stage declares its inputs (content hashes of the files it
reads, its options, the tool versions that shape its output); their canonical hash is the
stage's `input_hash` in the manifest. Re-running with an existing artifact at OUT reuses each
stage whose input hash is unchanged and whose recorded outputs are still intact (re-hashed),
hard-linking them into the new artifact; a stage whose inputs changed runs again, and so does
everything downstream of a changed graph. When nothing ran and the options are the same, OUT is
left untouched ("up to date"). Either way the artifact is written atomically
(`dsc.artifacts.atomic_dir`): a failure or Ctrl-C leaves OUT as it was and no temporary
directory behind.


Before any stage runs, the targets are checked (`dsc.pipeline.targets`): unknown profile,
precision the target cannot run, options the backend cannot honour, a model that does not fit
at the engine's envelope. `optimize` runs the graph passes (`dsc.passes`) unless
--no-optimize; `quantize` runs when a precision flag is given; `validate` is the accuracy gate for
a quantized build
(`dsc.validate.gate`: the quantized graph against its fp16 reference on held-out text; a failed
gate fails the build) and the smoke check (`dsc.pipeline.smoke`) otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from dsc import __version__
from dsc.artifacts import IO_SPEC, atomic_dir, load_manifest
from dsc.build_config import BuildConfig
from dsc.errors import CheckFailed, UsageError
from dsc.manifest import (
    graph_record,
    now,
    source_record,
    tool_versions,
    verify_artifact,
)
from dsc.outcome import BuildOutcome
from dsc.pipeline.progress import Progress
from dsc.stages import reusable
from dsc.stages.artifact import (
    UpToDate,
    carry_downstream,
    finish,
    gate_failure,
    keep_rejected,
    previous_artifact,
    rejected_path,
)
from dsc.stages.compile import COMPILE, aggregate, compile_artifact
from dsc.stages.export import ExportStage
from dsc.stages.graph import graph_inputs, reuse_graph_stages, run_graph_stages
from dsc.stages.optimize import OptimizeStage, pass_context
from dsc.stages.quantize import QuantizeStage
from dsc.stages.validate import VALIDATE

EXPORT, OPTIMIZE, QUANTIZE = ExportStage(), OptimizeStage(), QuantizeStage()
# `dsc build`, in order. The graph stages rewrite model.onnx in place, so they are reused
# together or not at all; compile runs per target; validate checks the compiled graph.
STAGES = (EXPORT, OPTIMIZE, QUANTIZE, COMPILE, VALIDATE)
GRAPH_STAGES = STAGES[:3]


def targets_for(config: BuildConfig, info) -> list:
    """The build targets of `config`'s profiles for the checkpoint `info` (an
    `inspect_checkpoint` result): `resolve_targets` with the build's envelope, overrides,
    backend and precisions. Raises what `resolve_targets` raises."""
    from dsc.pipeline.targets import resolve_targets
    from dsc.quantize import vocab_precisions

    return resolve_targets(
        config.profiles,
        model_config=info.config,
        model_name=info.path.resolve().name,
        dtype=config.dtype,
        **config.envelope_kwargs(),
        quantize=config.quantize,
        weight_precisions=vocab_precisions(config.quantize_lm_head, config.quantize_embedding),
    )


def build(
    checkpoint: str | Path,
    output: str | Path,
    config: BuildConfig,
    *,
    quiet: bool = False,
    echo=None,
    seed: Path | None = None,
) -> BuildOutcome:
    """Checkpoint → artifact with one engine (or preflight + device command) per profile.

    `seed`: where there is no artifact at OUT, a directory of stage records and outputs to reuse
    as if it were the previous artifact (`dsc matrix` runs the stages in workers)."""
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.quantize import check_vocab_options

    t_start = time.perf_counter()
    info = inspect_checkpoint(checkpoint, allow_pickle=config.allow_pickle)
    output = Path(output)
    targets = targets_for(config, info)
    check_vocab_options(
        config.quantize_lm_head, config.quantize_embedding, config.quantize, info.config
    )
    if config.opset is not None and not 18 <= config.opset <= 23:
        raise UsageError(f"opset {config.opset} is not supported by the exporter; choose 18..23")
    tools = tool_versions()
    # Pass names and calibration data are checked here, before any progress or work.
    ctx = pass_context(targets) if config.optimize else None
    graph_plan = graph_inputs(GRAPH_STAGES, config, info, ctx, tools)
    checkpoint_hashes = graph_plan["export"]["checkpoint"]
    previous, old = previous_artifact(output, info.path, checkpoint_hashes, force=config.force)
    if previous is None and seed is not None:
        previous, old = Path(seed), load_manifest(seed)
    if config.rebuild:
        old = {}
    old_stages = old.get("stages", {})
    progress = Progress(5, quiet=quiet, echo=echo)
    ran: dict[str, bool] = {}
    progress.say(
        f"dsc build {info.path} -> {output}: {info.family.name} {config.dtype}, "
        f"profiles {', '.join(t.name for t in targets)}"
    )
    for t in targets:
        progress.detail(
            f"{t.name}: mode {t.mode}, envelope {asdict(t.envelope)}, plan "
            f"{t.plan['total_bytes'] / 2**30:.3f} of "
            f"{t.plan['capacity_bytes'] / 2**30:.1f} GiB; " + "; ".join(t.notes)
        )
    # The graph stages (export, optimize, quantize) are reused together or not at all: a later
    # graph stage replaces model.onnx, so the earlier stage's graph is no longer there to reuse.
    chain_reusable = previous is not None and all(
        reusable(old_stages.get(name), EXPORT.input_hash(inputs), previous)
        if inputs is not None
        else (old_stages.get(name) or {}).get("status") in (None, "not_run")
        for name, inputs in graph_plan.items()
    )
    try:
        with atomic_dir(output, force=True) as tmp:
            stages: dict = {}
            if chain_reusable:
                stages = reuse_graph_stages(
                    GRAPH_STAGES, graph_plan, old_stages, previous, tmp, progress, ran
                )
            else:
                stages = run_graph_stages(
                    GRAPH_STAGES, config, info, ctx, tmp, graph_plan, progress, ran
                )
            io = json.loads((tmp / IO_SPEC).read_text())
            graph = graph_record(tmp, io)

            # 4. compile, per profile
            records, entries = COMPILE.run(
                targets, tmp, io, graph, tools, progress, previous, old, ran
            )
            stages["compile"] = {"status": aggregate(records), "profiles": records}

            # 5. validate
            stages["validate"], validation = VALIDATE.run(
                config, tmp, io, graph, tools, progress, old_stages.get("validate"), ran, previous
            )

            manifest = {
                "format": "dsc-artifact",
                "schema_version": 1,
                "created": now(),
                "command": "build",
                "tools": tools,
                "precision": config.quantize or config.dtype,
                "source": source_record(info, checkpoint_hashes),
                "graph": graph,
                "options": config.record(),
                "stages": stages,
                "profiles": entries,
                "outputs": {},
            }
            if validation is not None:
                manifest["validation"] = validation
            if validation and validation.get("kind") == "gate" and not validation["passed"]:
                finish(tmp, rejected_path(output), manifest, progress)
                raise CheckFailed(
                    gate_failure(config.quantize, validation, keep_rejected(tmp, output))
                )
            carry_downstream(previous, old, tmp, manifest, graph)

            if (
                previous is not None
                and not any(ran.values())
                and set(old.get("profiles") or {}) == set(entries)
                and old.get("options") == manifest["options"]
                and verify_artifact(previous).ok
            ):
                raise UpToDate()
            finish(tmp, output, manifest, progress)
    except UpToDate:
        progress.say(f"{output}: up to date, nothing rebuilt")
        return BuildOutcome(
            output, "build", True, time.perf_counter() - t_start, load_manifest(output), ran
        )
    return BuildOutcome(output, "build", False, time.perf_counter() - t_start, manifest, ran)


__all__ = ["STAGES", "BuildConfig", "BuildOutcome", "__version__", "build", "compile_artifact"]
