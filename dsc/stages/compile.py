"""Stage 4, compile: one TensorRT(-RTX) engine, or a preflight compile, per hardware target.

Inputs per target: the graph hash, the resolved profile and its overrides, the engine envelope,
the mode (rtx | device | preflight), the builder options and the TensorRT tool versions. Run by
`dsc build` (stage 4) and by `dsc compile` (more profiles into an existing artifact).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from dsc.manifest import hash_tree
from dsc.pipeline.progress import peak_rss_bytes, reset_peak_rss
from dsc.stages._base import Stage, StageRecord, link, reusable, reused

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

    def run(self, targets, tmp: Path, io: dict, graph: dict, tools: dict, progress,
            previous: Path | None, old_manifest: dict, ran: dict[str, bool], *,
            index: int | None = None) -> tuple[dict, dict]:
        return _compile(self, targets, tmp, io, graph, tools, progress, index or self.index,
                        previous, old_manifest, ran)


def _compile(stage: CompileStage, targets, tmp: Path, io: dict, graph: dict, tools: dict,
             progress, index: int, previous: Path | None, old_manifest: dict,
             ran: dict[str, bool]) -> tuple[dict, dict]:
    """Run (or reuse) the compile of every target; returns (stage records, profile entries)."""
    from dsc.pipeline.engines import compile_target

    old_stage = (old_manifest.get("stages", {}).get("compile") or {}).get("profiles", {})
    old_profiles = old_manifest.get("profiles") or {}
    records, entries = {}, {}
    for t in targets:
        inputs = stage.inputs(t, graph, tools)
        ih = stage.input_hash(inputs)
        old = old_stage.get(t.name)
        what = {"rtx": f"engine for SM{t.options.target_sm} with TensorRT-RTX (ahead of time)",
                "device": f"engine for this GPU (SM{t.profile.sm}) with standard TensorRT",
                "preflight": f"SM{t.profile.sm} cannot be built here: preflight compile for "
                             f"SM{t.preflight_options.target_sm if t.preflight_options else '?'}"
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
        records[t.name] = StageRecord("ran", ih, inputs, outputs, round(seconds, 2),
                                      peak_rss_bytes()).to_json()
        entry = dict(result.entry)
        entry.update({
            "mode": t.mode,
            "profile": t.profile.to_dict(),
            "overrides": list(t.profile.overrides),
            "envelope": asdict(result.envelope or t.envelope),
            "options": options_json(result.options or t.options),
            "plan": t.plan,
            "notes": [*t.notes, *result.notes],
        })
        for note in result.notes:
            progress.say(f"{done} {note}")
        entries[t.name] = entry
        ran[f"compile:{t.name}"] = True
        eng = entry.get("engine")
        end = (f"{eng['path']} ({eng['size_bytes'] / 2**20:,.1f} MiB)" if eng else
               f"preflight passed; engine to be built on the device ({entry['device_command']})")
        progress.say(f"{done} {end}, {seconds:.1f}s")
    return records, entries


def options_json(options) -> dict | None:
    if options is None:
        return None
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()
            if k != "timing_cache"}


def aggregate(records: dict) -> str:
    statuses = {r["status"] for r in records.values()}
    if not statuses:
        return "not_run"
    return "ran" if "ran" in statuses else "reused"
