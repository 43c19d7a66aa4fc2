"""Stage 4, compile: one TensorRT(-RTX) engine, or a preflight compile, per hardware target.

Inputs per target: the graph hash, the resolved profile and its overrides, the engine envelope,
the mode (rtx | device | preflight), the builder options and the TensorRT tool versions. Run by
`dsc build` (stage 4) and by `dsc compile` (`compile_artifact`: more profiles into an existing
artifact, atomically).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from dsc.artifacts import MANIFEST, atomic_dir, load_io_spec, load_manifest
from dsc.build_config import BuildConfig
from dsc.errors import BadInput, CheckFailed
from dsc.manifest import hash_tree, now, schema_errors, tool_versions, verify_artifact
from dsc.outcome import BUILD_LOG, BuildOutcome
from dsc.pipeline.progress import Progress, peak_rss_bytes, reset_peak_rss
from dsc.stages._base import Stage, StageRecord, link, reusable, reused
from dsc.stages.artifact import REPORTS, UpToDate, finish, graph_of, inherit

TOOLS = ("dsc", "tensorrt", "tensorrt-rtx-cu13")


class CompileStage(Stage):
    """One engine (or preflight) per target; its records are keyed by profile name."""

    name = "compile"
    index = 4

    def inputs(self, target, graph: dict, tools: dict) -> dict:
        t = target
        return {
            "graph": graph["hash"],
            "profile": t.profile.to_dict(),
            "overrides": list(t.profile.overrides),
            "envelope": asdict(t.envelope),
            "mode": t.mode,
            "options": options_json(t.options),
            "preflight_options": options_json(t.preflight_options),
            "tools": {k: tools.get(k) for k in TOOLS},
        }

    def run(
        self,
        targets,
        tmp: Path,
        io: dict,
        graph: dict,
        tools: dict,
        progress,
        previous: Path | None,
        old_manifest: dict,
        ran: dict[str, bool],
        *,
        index: int | None = None,
    ) -> tuple[dict, dict]:
        return _compile(
            self,
            targets,
            tmp,
            io,
            graph,
            tools,
            progress,
            index or self.index,
            previous,
            old_manifest,
            ran,
        )


def _compile(
    stage: CompileStage,
    targets,
    tmp: Path,
    io: dict,
    graph: dict,
    tools: dict,
    progress,
    index: int,
    previous: Path | None,
    old_manifest: dict,
    ran: dict[str, bool],
) -> tuple[dict, dict]:
    """Run (or reuse) the compile of every target; returns (stage records, profile entries)."""
    from dsc.pipeline.engines import compile_target

    old_stage = (old_manifest.get("stages", {}).get("compile") or {}).get("profiles", {})
    old_profiles = old_manifest.get("profiles") or {}
    records, entries = {}, {}
    for t in targets:
        inputs = stage.inputs(t, graph, tools)
        ih = stage.input_hash(inputs)
        old = old_stage.get(t.name)
        what = {
            "rtx": f"engine for SM{t.options.target_sm} with TensorRT-RTX (ahead of time)",
            "device": f"engine for this GPU (SM{t.profile.sm}) with standard TensorRT",
            "preflight": f"SM{t.profile.sm} cannot be built here: preflight compile for "
            f"SM{t.preflight_options.target_sm if t.preflight_options else '?'}",
        }[t.mode]
        label = progress.stage_line(index, "compile", f"{t.name}: {what}")
        done = progress.stage_line(index, "compile", f"{t.name}:")
        if reusable(old, ih, previous) and t.name in old_profiles:
            link(previous, tmp, old["outputs"])
            records[t.name] = reused(old)
            # The plan is a function of the compile inputs: recomputed, it can only gain the
            # fields a newer dsc records (e.g. the decode ceiling).
            entries[t.name] = dict(old_profiles[t.name], plan=t.plan)
            progress.say(f"{done} reused (inputs unchanged)")
            ran[f"compile:{t.name}"] = False
            continue
        progress.say(f"{label} ...")
        t0 = time.perf_counter()
        reset_peak_rss()
        result = compile_target(t, tmp, io, progress, previous=previous)
        seconds = time.perf_counter() - t0
        sub = tmp / "engines" / t.name
        outputs = {f"engines/{t.name}/{k}": v for k, v in hash_tree(sub).items()}
        records[t.name] = StageRecord(
            "ran", ih, inputs, outputs, round(seconds, 2), peak_rss_bytes()
        ).to_json()
        entry = dict(result.entry)
        entry.update(
            {
                "mode": t.mode,
                "profile": t.profile.to_dict(),
                "overrides": list(t.profile.overrides),
                "envelope": asdict(result.envelope or t.envelope),
                "options": options_json(result.options or t.options),
                "plan": t.plan,
                "notes": [*t.notes, *result.notes],
            }
        )
        for note in result.notes:
            progress.say(f"{done} {note}")
        entries[t.name] = entry
        ran[f"compile:{t.name}"] = True
        eng = entry.get("engine")
        end = (
            f"{eng['path']} ({eng['size_bytes'] / 2**20:,.1f} MiB)"
            if eng
            else f"preflight passed; engine to be built on the device ({entry['device_command']})"
        )
        progress.say(f"{done} {end}, {seconds:.1f}s")
    return records, entries


def options_json(options) -> dict | None:
    if options is None:
        return None
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(options).items()
        if k != "timing_cache"
    }


def aggregate(records: dict) -> str:
    statuses = {r["status"] for r in records.values()}
    if not statuses:
        return "not_run"
    return "ran" if "ran" in statuses else "reused"


COMPILE = CompileStage()


def compile_artifact(
    artifact: str | Path, config: BuildConfig, *, quiet: bool = False, echo=None
) -> BuildOutcome:
    """Build engines (or preflights) for more profiles into an existing artifact, atomically."""
    from dsc.pipeline.targets import resolve_targets

    t_start = time.perf_counter()
    artifact = Path(artifact)
    old = load_manifest(artifact)
    listed = old.get("outputs", {})
    # Only a verified artifact is compiled (schema problems aside: records another tool wrote
    # are kept as they are, below); its graph record then follows from the verified hashes.
    problems = [
        (f, why)
        for f, why in verify_artifact(artifact).problems
        if not (f == MANIFEST and why.startswith("schema:"))
    ]
    if problems:
        rel, why = problems[0]
        raise CheckFailed(
            f"{artifact}: {rel} does not match manifest.json ({why}); dsc compile "
            f"builds only a verified artifact (dsc verify {artifact})"
        )
    io = load_io_spec(artifact)
    try:
        model_config = json.loads((artifact / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"artifact {artifact} has no readable config.json: {e}") from None
    dtype = str(io.get("dtype", "fp16"))
    inherited = inherit(config, old.get("options") or {})
    dla_inherited = inherited.dla_core is not None and config.dla_core is None
    config = inherited
    targets = resolve_targets(
        config.profiles,
        model_config=model_config,
        model_name=old.get("source", {})
        .get("checkpoint", str(artifact))
        .rstrip("/")
        .split("/")[-1],
        dtype=dtype,
        **config.envelope_kwargs(),
        dla_required=not dla_inherited,
        quantize=io.get("quantization"),
        weight_precisions=io.get("vocab_quantization") or {},
    )
    graph = graph_of(io, listed)
    tools = tool_versions()
    names = {t.name for t in targets}
    progress = Progress(1, quiet=quiet, echo=echo)
    progress.say(f"dsc compile {artifact}: profiles {', '.join(sorted(names))}")
    ran: dict[str, bool] = {}
    reuse_from = None if config.rebuild else old
    try:
        with atomic_dir(artifact, force=True) as tmp:
            keep = [
                rel
                for rel in listed
                if rel not in (BUILD_LOG, *REPORTS)
                and not any(rel.startswith(f"engines/{n}/") for n in names)
                and (artifact / rel).is_file()
            ]
            link(artifact, tmp, keep)
            records, entries = COMPILE.run(
                targets, tmp, io, graph, tools, progress, artifact, reuse_from or {}, ran, index=1
            )
            if not any(ran.values()):
                raise UpToDate()
            manifest = json.loads(json.dumps(old))
            manifest.update(created=now(), command="compile")
            manifest["tools"] = {**old.get("tools", {}), **tools}
            manifest["graph"] = graph  # the graph just compiled (checked against outputs)
            stage = manifest.setdefault("stages", {}).setdefault(
                "compile", {"status": "ran", "profiles": {}}
            )
            stage.setdefault("profiles", {}).update(records)
            stage["status"] = aggregate(stage["profiles"])
            manifest.setdefault("profiles", {}).update(entries)
            # build.log keeps the earlier runs (it was not linked: it is rewritten here).
            if (artifact / BUILD_LOG).is_file():
                earlier = (artifact / BUILD_LOG).read_text().rstrip("\n")
                progress.lines = [earlier, f"== dsc compile at {now()}", *progress.lines]
            old_errors = schema_errors(old)
            if old_errors:
                # Records another tool wrote are kept as they are, not repaired or refused.
                progress.say(
                    f"note: {MANIFEST} did not match the schema before this compile "
                    f"({old_errors[0]}); its records are kept unchanged"
                )
            finish(tmp, artifact, manifest, progress, check=not old_errors)
    except UpToDate:
        progress.say(f"{artifact}: up to date, nothing rebuilt")
        return BuildOutcome(
            artifact, "compile", True, time.perf_counter() - t_start, load_manifest(artifact), ran
        )
    return BuildOutcome(artifact, "compile", False, time.perf_counter() - t_start, manifest, ran)
