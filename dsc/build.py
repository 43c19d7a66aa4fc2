"""`dsc build` and `dsc compile`: the pipeline as an ordered list of stages, with reuse.

    export → optimize → quantize → compile (one record per hardware profile) → validate

Every stage declares its inputs (content hashes of the files it reads, its options, the tool
versions that shape its output); their canonical hash is the stage's `input_hash` in the
manifest. Re-running with an existing artifact at OUT reuses each stage whose input hash is
unchanged and whose recorded outputs are still intact (re-hashed), hard-linking them into the
new artifact; a stage whose inputs changed runs again, and so does everything downstream of a
changed graph. When nothing ran and the options are the same, OUT is left untouched ("up to
date"). Either way the artifact is written atomically (`dsc.artifacts.atomic_dir`): a failure or
Ctrl-C leaves OUT as it was and no temporary directory behind.

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
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dsc import __version__
from dsc.artifacts import (
    IO_SPEC,
    MANIFEST,
    atomic_dir,
    check_output,
    is_artifact,
    is_external_data,
    load_io_spec,
    load_manifest,
)
from dsc.errors import BadInput, CheckFailed, OutputConflict, UsageError
from dsc.manifest import (
    canonical_hash,
    export_inputs,
    graph_record,
    hash_tree,
    now,
    relpath,
    schema_errors,
    source_record,
    tool_versions,
    verify_artifact,
    write_manifest,
)
from dsc.models.checkpoint import sha256_file
from dsc.paths import contained
from dsc.pipeline.progress import Progress, peak_rss_bytes, reset_peak_rss

logger = logging.getLogger(__name__)

BUILD_LOG = "build.log"
REPORTS = ("report.json", "report.md", "report.html")
VALIDATE_KINDS = ("auto", "smoke", "gate", "none")
NOT_RUN = {
    "optimize": "--no-optimize",
    "quantize": "no quantization requested",
}
# Files `dsc validate` / `dsc bench` add; kept across a rebuild when the graph is unchanged.
DOWNSTREAM_KEYS = ("bench",)


@dataclass(frozen=True)
class BuildConfig:
    """Every option of `dsc build` / `dsc compile` (the keys of dsc.yaml, minus paths)."""

    profiles: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()  # --set key=value, applied to every profile
    dtype: str = "fp16"
    opset: int | None = None
    external_data: bool = False  # always write weights to model.onnx.data (else at 1.5 GiB)
    max_batch: int | None = None
    max_input_len: int | None = None
    max_kv: int | None = None
    max_num_tokens: int | None = None
    backend: str = "auto"  # auto | tensorrt_rtx | tensorrt
    dla_core: int | None = None
    validate: str = "auto"  # auto (gate when quantized, else smoke) | smoke | gate | none
    validate_tokens: int = 8
    allow_pickle: bool = False
    force: bool = False  # replace an artifact of another checkpoint at OUT
    rebuild: bool = False  # ignore what OUT holds; run every stage
    # 2. graph passes (dsc.passes): the default pipeline unless `passes` names some
    optimize: bool = True
    passes: tuple[str, ...] = ()
    disable_passes: tuple[str, ...] = ()
    # 3. quantization (dsc.quantize): None, int8, fp8 or int4 (AWQ)
    quantize: str | None = None
    weight_only: bool = False
    calib: str | None = None  # text / JSONL / directory; None: the shipped calibration text
    calib_method: str | None = None
    alpha: float | None = None  # SmoothQuant α; None: searched per layer ("auto")
    calib_samples: int = 64
    calib_seq_len: int = 128
    exclude: tuple[str, ...] = ()
    # vocabulary weights, weight-only (dsc.passes.quant.vocab): None, int8, int4 or fp8
    quantize_lm_head: str | None = None
    quantize_embedding: str | None = None

    def __post_init__(self):
        for name in ("profiles", "overrides", "passes", "disable_passes", "exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.calib is not None:
            object.__setattr__(self, "calib", str(self.calib))
        if self.quantize is not None:
            from dsc.precision import check_quantized

            check_quantized(self.quantize)
            if self.dtype == "fp32":
                raise UsageError("quantization needs a half-precision graph (--dtype fp16 or bf16)")
        from dsc.quantize import check_vocab_options

        check_vocab_options(self.quantize_lm_head, self.quantize_embedding, self.quantize)
        if self.weight_only and self.quantize != "int8":
            raise UsageError("--weight-only applies to --int8 only (INT4-AWQ is always "
                             "weight-only; FP8 quantizes weights and activations)")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise UsageError("calibration needs at least 1 sample of at least 2 tokens")
        if self.validate == "gate" and self.quantize is None:
            raise UsageError("--validate gate compares a quantized graph with its fp16 reference: "
                             "add --int8, --fp8 or --int4-awq (or run `dsc validate --reference`)")
        if not self.optimize and (self.passes or self.disable_passes):
            raise UsageError("--passes/--disable-pass contradict --no-optimize")
        if self.validate not in VALIDATE_KINDS:
            raise UsageError(f"unknown validation {self.validate!r} (choose "
                             f"{', '.join(VALIDATE_KINDS)})")
        if self.validate_tokens < 1:
            raise UsageError(f"validate_tokens must be at least 1, got {self.validate_tokens}")
        for name in ("max_batch", "max_input_len", "max_kv", "max_num_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")

    def record(self) -> dict:
        """The options as the manifest records them (not the ones that only steer this run)."""
        d = asdict(self)
        for k in ("force", "rebuild"):
            d.pop(k)
        for k in ("profiles", "overrides", "passes", "disable_passes", "exclude"):
            d[k] = list(getattr(self, k))
        return d

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class BuildOutcome:
    """What a build or compile did; `to_json()` is the `--json` document."""

    artifact: Path
    command: str
    up_to_date: bool
    seconds: float
    manifest: dict
    ran: dict[str, bool] = field(default_factory=dict)  # stage (or compile:<p>) -> ran

    def to_json(self) -> dict:
        m = self.manifest
        art = self.artifact
        stages = {}
        for name, st in m.get("stages", {}).items():
            stages[name] = {"status": st.get("status")}
            if "reason" in st:
                stages[name]["reason"] = st["reason"]
            if "seconds" in st:
                stages[name]["seconds"] = st["seconds"]
            if name == "compile":
                stages[name]["profiles"] = {p: r.get("status")
                                            for p, r in st.get("profiles", {}).items()}
        profiles = {}
        for name, p in (m.get("profiles") or {}).items():
            eng = p.get("engine")
            profiles[name] = {
                "status": p["status"],
                "sm": p["sm"],
                "built_here": p["status"] == "built",
                "engine": str(art / eng["path"]) if eng else None,
                "engine_bytes": eng["size_bytes"] if eng else None,
                "backend": eng["backend"] if eng else None,
                "runtime": eng.get("runtime") if eng else None,
                "preflight": p.get("preflight"),
                "device_command": str(art / p["device_command"]) if p.get("device_command")
                else None,
                "finish_on_device": (None if eng else
                                     f"dsc compile {art} --profile {name}"),
            }
        files = {"manifest": str(art / MANIFEST)}
        for key, name in (("log", BUILD_LOG), ("report", "report.html")):
            if (art / name).is_file():
                files[key] = str(art / name)
        return {"artifact": str(art), "command": self.command, "up_to_date": self.up_to_date,
                "seconds": round(self.seconds, 2), "stages": stages, "profiles": profiles,
                "validation": m.get("validation"), "files": files}

    def format(self) -> str:
        """The plain-language summary printed at the end of `dsc build` / `dsc compile`."""
        d = self.to_json()
        src = self.manifest.get("source", {})
        head = (f"artifact {d['artifact']} is up to date (nothing to do)" if self.up_to_date
                else f"{'built' if self.command == 'build' else 'compiled'} artifact "
                     f"{d['artifact']} ({src.get('family')}, {self.manifest.get('precision')}) "
                     f"in {self.seconds:.1f}s")
        lines = [head]
        built = {n: p for n, p in d["profiles"].items() if p["built_here"]}
        pending = {n: p for n, p in d["profiles"].items() if not p["built_here"]}
        width = max((len(n) for n in d["profiles"]), default=0)
        if built:
            lines.append("  engines built:")
            for n, p in built.items():
                rt = ("TensorRT-RTX, ahead of time; runs with the TensorRT-RTX runtime"
                      if p["backend"] == "tensorrt_rtx" else "standard TensorRT, on this GPU")
                lines.append(f"    {n:<{width}}  SM{p['sm']}  {p['engine']} "
                             f"({p['engine_bytes'] / 2**20:,.1f} MiB; {rt})")
        if pending:
            lines.append("  engines NOT built here (TensorRT-RTX cannot target them) - finish "
                         "each on its device with standard TensorRT:")
            for n, p in pending.items():
                pre = p["preflight"] or {}
                lines.append(f"    {n:<{width}}  SM{p['sm']}  preflight compile for "
                             f"SM{pre.get('sm')} passed; on the device run: "
                             f"{p['finish_on_device']}  (or sh {p['device_command']})")
        if not d["profiles"]:
            lines.append("  no engines (dsc compile ARTIFACT --profile P builds one)")
        v = d.get("validation")
        if v:
            if v.get("kind") == "smoke":
                if v.get("status") == "skipped":
                    lines.append(f"  validation: smoke check skipped ({v.get('reason')})")
                else:
                    verdict = "passed" if v.get("passed") else "FAILED"
                    n = len(v.get("generated_tokens", []))
                    lines.append(f"  validation: smoke check {verdict} (ONNX Runtime: finite "
                                 f"logits, {n} greedy tokens, KV cache = prefill to "
                                 f"{v.get('kv_rel_diff', 0):.1e}); accuracy gate: "
                                 f"dsc validate {d['artifact']}")
                    if v.get("text"):
                        lines.append(f"    greedy text: {' '.join(v['text'].split())!r}")
            else:
                lines.append(f"  validation: {v.get('kind')} "
                             f"{'passed' if v.get('passed') else 'FAILED'}")
        f = d["files"]
        lines.append("  " + "  ".join(f"{k}: {v}" for k, v in f.items()))
        return "\n".join(lines)


class _UpToDate(Exception):
    """Raised inside atomic_dir to drop the new copy when it would equal the old artifact."""


# --- helpers --------------------------------------------------------------------------------


def _link(src_root: Path, dst_root: Path, rels) -> None:
    """Hard-link (or copy) files of the previous artifact into the one being written.

    ONNX external-data files are copied, never linked: onnx and onnx-ir refuse to read a data
    file with more than one hard link (a guard against tampering through a shared inode)."""
    for rel in rels:
        src, dst = contained(src_root, rel), contained(dst_root, rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        if is_external_data(rel):
            shutil.copy2(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _intact(root: Path | None, outputs: dict) -> bool:
    if root is None:
        return False
    for rel, digest in outputs.items():
        p = contained(root, rel, what=f"{MANIFEST} of {root} names")
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def _reusable(old: dict | None, input_hash: str, root: Path | None) -> bool:
    return (bool(old) and old.get("status") in ("ran", "reused")
            and old.get("input_hash") == input_hash and _intact(root, old.get("outputs", {})))


def _reused(old: dict) -> dict:
    return dict(old, status="reused")


def _previous(output: Path, checkpoint: Path, checkpoint_hashes: dict, *,
              force: bool) -> tuple[Path | None, dict]:
    """The artifact already at OUT that this build may reuse, and its manifest.

    An artifact of the same checkpoint (same directory, or same content elsewhere) is updated
    in place; one of another checkpoint is replaced only with --force.
    """
    if not output.exists():
        check_output(output, force=True)  # an output path under a file is refused here
        return None, {}
    if output.is_file() or output.is_symlink():
        raise OutputConflict(f"output path {output} is a file, not a directory")
    if not any(output.iterdir()):
        return None, {}
    if not is_artifact(output):
        raise OutputConflict(f"output path {output} is not empty and is not a dsc artifact; "
                             f"choose another path")
    m = load_manifest(output)
    src = m.get("source", {})
    same = (src.get("inputs") == checkpoint_hashes
            or src.get("checkpoint") == str(Path(checkpoint).resolve()))
    if not same and not force:
        raise OutputConflict(
            f"output path {output} holds an artifact of another checkpoint "
            f"({m.get('source', {}).get('checkpoint', '?')}); pass --force to replace it")
    return output, m


def _fix_report_paths(root: Path, dest: Path) -> None:
    """report.* name the directory they were generated in: the temp dir, until the swap."""
    import html

    from markupsafe import escape

    pairs = []
    for a, b in ((str(root.resolve()), str(dest.resolve())), (str(root), str(dest))):
        # as written in report.json, and as Jinja2 (markupsafe) or html.escape write it
        pairs += [(a, b), (json.dumps(a)[1:-1], json.dumps(b)[1:-1]),
                  (str(escape(a)), str(escape(b))), (html.escape(a), html.escape(b))]
    for name in REPORTS:
        p = root / name
        if p.is_file():
            text = p.read_text()
            for a, b in pairs:
                text = text.replace(a, b)
            p.write_text(text)


def _finish(tmp: Path, dest: Path, manifest: dict, progress: Progress, *,
            check: bool = True) -> dict:
    """Write build.log, the reports and the final manifest (outputs: every file) into `tmp`."""
    from dsc.validate.report import write_reports

    (tmp / BUILD_LOG).write_text(progress.text())
    manifest["outputs"] = hash_tree(tmp)
    write_manifest(tmp, manifest, check=check)
    write_reports(tmp)
    _fix_report_paths(tmp, dest)
    manifest["outputs"] = hash_tree(tmp)
    write_manifest(tmp, manifest, check=check)
    return manifest


def _compile_stage(targets, tmp: Path, io: dict, graph: dict, tools: dict, progress: Progress,
                   index: int, previous: Path | None, old_manifest: dict,
                   ran: dict[str, bool]) -> tuple[dict, dict]:
    """Run (or reuse) the compile of every target; returns (stage records, profile entries)."""
    from dsc.pipeline.engines import compile_target

    old_stage = (old_manifest.get("stages", {}).get("compile") or {}).get("profiles", {})
    old_profiles = old_manifest.get("profiles") or {}
    records, entries = {}, {}
    for t in targets:
        inputs = {
            "graph": graph["hash"],
            "profile": t.profile.to_dict(),
            "overrides": list(t.profile.overrides),
            "envelope": asdict(t.envelope),
            "mode": t.mode,
            "options": _options_json(t.options),
            "preflight_options": _options_json(t.preflight_options),
            "tools": {k: tools.get(k) for k in ("dsc", "tensorrt", "tensorrt-rtx-cu13")},
        }
        ih = canonical_hash(inputs)
        old = old_stage.get(t.name)
        what = {"rtx": f"engine for SM{t.options.target_sm} with TensorRT-RTX (ahead of time)",
                "device": f"engine for this GPU (SM{t.profile.sm}) with standard TensorRT",
                "preflight": f"SM{t.profile.sm} cannot be built here: preflight compile for "
                             f"SM{t.preflight_options.target_sm if t.preflight_options else '?'}"
                }[t.mode]
        label = progress.stage_line(index, "compile", f"{t.name}: {what}")
        done = progress.stage_line(index, "compile", f"{t.name}:")
        if _reusable(old, ih, previous) and t.name in old_profiles:
            _link(previous, tmp, old["outputs"])
            records[t.name] = _reused(old)
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
        records[t.name] = {"status": "ran", "input_hash": ih, "inputs": inputs,
                           "outputs": outputs, "seconds": round(seconds, 2),
                           "peak_rss_bytes": peak_rss_bytes()}
        entry = dict(result.entry)
        entry.update({
            "mode": t.mode,
            "profile": t.profile.to_dict(),
            "overrides": list(t.profile.overrides),
            "envelope": asdict(result.envelope or t.envelope),
            "options": _options_json(result.options or t.options),
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


def _options_json(options) -> dict | None:
    if options is None:
        return None
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()
            if k != "timing_cache"}


def _aggregate(records: dict) -> str:
    statuses = {r["status"] for r in records.values()}
    if not statuses:
        return "not_run"
    return "ran" if "ran" in statuses else "reused"


# --- dsc build ------------------------------------------------------------------------------


def build(checkpoint: str | Path, output: str | Path, config: BuildConfig, *,
          quiet: bool = False, echo=None) -> BuildOutcome:
    """Checkpoint → artifact with one engine (or preflight + device command) per profile."""
    from dsc.models.checkpoint import inspect_checkpoint
    from dsc.pipeline.smoke import PROMPT, smoke_validate
    from dsc.pipeline.targets import resolve_targets
    from dsc.quantize import check_vocab_options, vocab_precisions

    t_start = time.perf_counter()
    info = inspect_checkpoint(checkpoint, allow_pickle=config.allow_pickle)
    output = Path(output)
    targets = resolve_targets(
        config.profiles, model_config=info.config, model_name=info.path.resolve().name,
        dtype=config.dtype, overrides=list(config.overrides), max_batch=config.max_batch,
        max_input_len=config.max_input_len, max_kv=config.max_kv,
        max_num_tokens=config.max_num_tokens, backend=config.backend,
        dla_core=config.dla_core, quantize=config.quantize,
        weight_precisions=vocab_precisions(config.quantize_lm_head, config.quantize_embedding))
    check_vocab_options(config.quantize_lm_head, config.quantize_embedding, config.quantize,
                        info.config)
    if config.opset is not None and not 18 <= config.opset <= 23:
        raise UsageError(f"opset {config.opset} is not supported by the exporter; choose 18..23")
    tools = tool_versions()
    export_in = export_inputs(info, dtype=config.dtype, opset=config.opset, tools=tools,
                              external_data=config.external_data)
    # Pass names and calibration data are checked here, before any progress or work.
    ctx = _pass_context(targets) if config.optimize else None
    graph_plan = _graph_stage_inputs(config, ctx, export_in, tools)
    previous, old = _previous(output, info.path, export_in["checkpoint"], force=config.force)
    if config.rebuild:
        old = {}
    old_stages = old.get("stages", {})
    progress = Progress(5, quiet=quiet, echo=echo)
    ran: dict[str, bool] = {}
    progress.say(f"dsc build {info.path} -> {output}: {info.family.name} {config.dtype}, "
                 f"profiles {', '.join(t.name for t in targets)}")
    for t in targets:
        progress.detail(f"{t.name}: mode {t.mode}, envelope {asdict(t.envelope)}, plan "
                        f"{t.plan['total_bytes'] / 2**30:.3f} of "
                        f"{t.plan['capacity_bytes'] / 2**30:.1f} GiB; "
                        + "; ".join(t.notes))
    # The graph stages (export, optimize, quantize) are reused together or not at all: a later
    # graph stage replaces model.onnx, so the earlier stage's graph is no longer there to reuse.
    chain_reusable = previous is not None and all(
        _reusable(old_stages.get(name), canonical_hash(inputs), previous)
        if inputs is not None else (old_stages.get(name) or {}).get("status") in (None, "not_run")
        for name, inputs in graph_plan.items())
    try:
        with atomic_dir(output, force=True) as tmp:
            stages: dict = {}
            if chain_reusable:
                for i, name in enumerate(graph_plan, 1):
                    rec = old_stages.get(name)
                    if graph_plan[name] is None:
                        stages[name] = {"status": "not_run", "reason": NOT_RUN[name]}
                        progress.say(progress.stage_line(i, name, f"not run ({stages[name]['reason']})"))
                    else:
                        stages[name] = _reused(rec)
                        _link(previous, tmp, rec["outputs"])
                        progress.say(f"{progress.stage_line(i, name, '')}reused (inputs unchanged)")
                    ran[name] = False
            else:
                stages = _run_graph_stages(config, info, ctx, tmp, graph_plan, progress, ran)
            io = json.loads((tmp / IO_SPEC).read_text())
            graph = graph_record(tmp, io)

            # 4. compile, per profile
            records, entries = _compile_stage(targets, tmp, io, graph, tools, progress, 4,
                                              previous, old, ran)
            stages["compile"] = {"status": _aggregate(records), "profiles": records}

            # 5. validate
            stages["validate"], validation = _validate_stage(
                config, tmp, io, graph, tools, progress, old_stages.get("validate"), ran,
                smoke_validate, PROMPT, previous)

            manifest = {
                "format": "dsc-artifact",
                "schema_version": 1,
                "created": now(),
                "command": "build",
                "tools": tools,
                "precision": config.quantize or config.dtype,
                "source": source_record(info, export_in["checkpoint"]),
                "graph": graph,
                "options": config.record(),
                "stages": stages,
                "profiles": entries,
                "outputs": {},
            }
            if validation is not None:
                manifest["validation"] = validation
            if validation and validation.get("kind") == "gate" and not validation["passed"]:
                _finish(tmp, _rejected_path(output), manifest, progress)
                raise CheckFailed(_gate_failure(config.quantize, validation,
                                                _keep_rejected(tmp, output)))
            _carry_downstream(previous, old, tmp, manifest, graph)

            if (previous is not None and not any(ran.values())
                    and set(old.get("profiles") or {}) == set(entries)
                    and old.get("options") == manifest["options"]
                    and verify_artifact(previous).ok):
                raise _UpToDate()
            _finish(tmp, output, manifest, progress)
    except _UpToDate:
        progress.say(f"{output}: up to date, nothing rebuilt")
        return BuildOutcome(output, "build", True, time.perf_counter() - t_start,
                            load_manifest(output), ran)
    return BuildOutcome(output, "build", False, time.perf_counter() - t_start, manifest, ran)



def _pass_context(targets):
    """The pass context for the graph every target of this build compiles.

    One graph serves every profile, so fused ops are those all targets parse: the target's own
    op set when the targets agree, else the portable one (ops every supported TensorRT parses).
    """
    from dsc.passes import PassContext, PassOptions, target_ops

    # Compare what the targets parse, not their names (two TensorRT versions may agree).
    ops = {json.dumps({k: v for k, v in target_ops(t.profile).to_json().items() if k != "name"},
                      sort_keys=True) for t in targets}
    if len(ops) == 1:
        return PassContext(targets[0].profile, PassOptions())
    half = any(not target_ops(t.profile).fp32_gemm for t in targets)
    return PassContext(None, PassOptions(target_ops="portable", half_fp32_gemm=half))


def _graph_stage_inputs(config: BuildConfig, ctx, export_in: dict,
                        tools: dict) -> dict[str, dict | None]:
    """Inputs of export, optimize and quantize (None: the stage is not requested).

    Each later stage's inputs include the previous stage's input hash: the exporter and the
    passes are deterministic, so equal upstream inputs mean the same graph.
    """
    from dsc.passes import build_pipeline

    plan: dict[str, dict | None] = {"export": export_in}
    upstream = canonical_hash(export_in)
    if config.optimize:
        names = [n for n, _ in build_pipeline(ctx, config.passes or None, config.disable_passes)]
        inputs = {"upstream": upstream, "passes": names, "options": asdict(ctx.options),
                  "target": ctx.target.to_json(),
                  "tools": {k: tools.get(k) for k in ("dsc", "onnx", "onnxscript", "onnx-ir")}}
        plan["optimize"] = inputs
        upstream = canonical_hash(inputs)
    else:
        plan["optimize"] = None
    if config.quantize:
        from dsc.quantize import calibration_sha256, vocab_inputs

        inputs = {"upstream": upstream, "precision": config.quantize,
                  "weight_only": config.weight_only or config.quantize == "int4",
                  "method": config.calib_method,
                  "alpha": "auto" if config.alpha is None else config.alpha,
                  "samples": config.calib_samples, "seq_len": config.calib_seq_len,
                  "exclude": list(config.exclude), "calib_sha256": calibration_sha256(config.calib),
                  "tools": {k: tools.get(k) for k in ("dsc", "onnxruntime", "onnx-ir")},
                  **vocab_inputs(config.quantize_lm_head, config.quantize_embedding)}
        plan["quantize"] = inputs
    else:
        plan["quantize"] = None
    return plan


def _files(root: Path) -> set[str]:
    """Relative paths of the files under `root` (names only: no hashing)."""
    return {relpath(p, root) for p in root.rglob("*") if p.is_file()}


def _run_graph_stages(config: BuildConfig, info, ctx, tmp: Path, plan: dict,
                      progress: Progress, ran: dict) -> dict:
    """Export, then optimize and quantize in place; returns the stage records."""
    from dsc.export import onnx_export

    stages: dict = {}
    written: dict[str, set[str]] = {}
    # 1. export
    label = progress.stage_line(1, "export", f"{info.architecture} -> ONNX {config.dtype}")
    progress.say(f"{label} ...")
    t0 = time.perf_counter()
    reset_peak_rss()
    g = onnx_export.export_graph(info, tmp, dtype=config.dtype, opset=config.opset,
                                 external_data=config.external_data, progress=progress.sub)
    for f in info.tokenizer_files:
        shutil.copy2(f, tmp / f.name)
    shutil.copy2(info.path / "config.json", tmp / "config.json")
    (tmp / IO_SPEC).write_text(json.dumps(dict(g.io_spec, dtype=config.dtype), indent=2) + "\n")
    seconds = time.perf_counter() - t0
    stages["export"] = {"status": "ran", "input_hash": canonical_hash(plan["export"]),
                        "inputs": plan["export"], "outputs": {},
                        "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss_bytes(),
                        "dtype": config.dtype, "opset": g.io_spec.get("opset")}
    written["export"] = _files(tmp)
    # A later stage rewrites these in place (same names); everything else it writes is new.
    rewritten = {g.onnx_path.name, f"{g.onnx_path.name}.data", IO_SPEC}
    progress.say(f"{progress.stage_line(1, 'export', '')}{g.onnx_path.name} written, "
                 f"{seconds:.1f}s")
    ran["export"] = True
    # 2. optimize
    if plan["optimize"] is None:
        stages["optimize"] = {"status": "not_run", "reason": NOT_RUN["optimize"]}
        progress.say(progress.stage_line(2, "optimize",
                                         f"not run ({stages['optimize']['reason']})"))
    else:
        from dsc.passes.optimize import optimize_in_place, stage_summary

        label = progress.stage_line(2, "optimize", f"graph passes for {ctx.target.name}")
        progress.say(f"{label} ...")
        t0 = time.perf_counter()
        reset_peak_rss()
        before = _files(tmp)
        report, record = optimize_in_place(tmp, ctx, only=config.passes or None,
                                           disable=config.disable_passes)
        seconds = time.perf_counter() - t0
        written["optimize"] = (_files(tmp) - before) | rewritten
        stages["optimize"] = {"status": "ran", "input_hash": canonical_hash(plan["optimize"]),
                              "inputs": plan["optimize"], "outputs": {},
                              "seconds": round(seconds, 2), "peak_rss_bytes": peak_rss_bytes(),
                              **stage_summary(record)}
        for p in report.passes:
            progress.detail(f"pass {p.name}: {p.seconds * 1e3:.1f} ms, nodes {p.nodes_before} "
                            f"-> {p.nodes_after}"
                            + (f", {p.counts}" if p.counts else ""))
        cov = ", ".join(f"{k} {v['fused']}/{v['blocks']}"
                        for k, v in stages["optimize"]["coverage"].items() if v["blocks"])
        progress.say(f"{progress.stage_line(2, 'optimize', '')}nodes {report.nodes_before} -> "
                     f"{report.nodes_after}; fused {cov or 'nothing'}, {seconds:.1f}s")
        ran["optimize"] = True
    # 3. quantize
    if plan["quantize"] is None:
        stages["quantize"] = {"status": "not_run", "reason": NOT_RUN["quantize"]}
        progress.say(progress.stage_line(3, "quantize", f"not run ({NOT_RUN['quantize']})"))
    else:
        from dsc.quantize import quantize_in_place

        q = plan["quantize"]
        progress.say(f"{progress.stage_line(3, 'quantize', q['precision'])} ...")
        t0 = time.perf_counter()
        reset_peak_rss()
        before = _files(tmp)
        report, extra = quantize_in_place(
            tmp, config.quantize, calib=config.calib, method=config.calib_method,
            samples=config.calib_samples, seq_len=config.calib_seq_len, alpha=config.alpha,
            weight_only=config.weight_only, exclude=config.exclude,
            lm_head=config.quantize_lm_head, embedding=config.quantize_embedding,
            progress=progress.sub)
        seconds = time.perf_counter() - t0
        written["quantize"] = (_files(tmp) - before) | rewritten
        stages["quantize"] = {"status": "ran", "input_hash": canonical_hash(q), "inputs": q,
                              "outputs": {}, "seconds": round(seconds, 2),
                              "peak_rss_bytes": peak_rss_bytes(), **extra}
        if extra["under_calibrated_experts"]:
            progress.say(f"warning: {extra['under_calibrated_experts']} MoE experts saw fewer "
                         f"than {report['experts']['min_tokens']} calibration tokens "
                         f"(quant_report.json lists them)")
        vocab = ", ".join(f"{k} {v['precision']}" for k in ("lm_head", "embedding")
                          if (v := extra.get(k)))
        progress.say(f"{progress.stage_line(3, 'quantize', '')}{extra['scheme']}: "
                     f"{extra['quantized_layers']} layers quantized"
                     + (f" (+ {vocab}, weight-only)" if vocab else "")
                     + f", {len(report['excluded'])} kept in float, {seconds:.1f}s")
        ran["quantize"] = True
    # Each file belongs to the last stage that wrote it.
    final = hash_tree(tmp)
    owner: dict[str, str] = {}
    for name in ("export", "optimize", "quantize"):
        for rel in written.get(name, ()):
            if rel in final:
                owner[rel] = name
    for rel, name in owner.items():
        stages[name]["outputs"][rel] = final[rel]
    return stages


def _validate_stage(config: BuildConfig, tmp: Path, io: dict, graph: dict, tools: dict,
                    progress: Progress, old: dict | None, ran: dict, smoke_validate,
                    prompt: str, previous: Path | None = None) -> tuple[dict, dict | None]:
    if config.validate == "none":
        progress.say(progress.stage_line(5, "validate", "not run (--validate none)"))
        return {"status": "not_run", "reason": "--validate none"}, None
    if config.validate == "gate" or (config.validate == "auto" and config.quantize):
        return _gate_stage(config, tmp, io, graph, tools, progress, old, ran, previous)
    inputs = {"graph": graph["hash"], "kind": "smoke", "tokens": config.validate_tokens,
              "prompt": prompt, "tools": {k: tools.get(k) for k in ("dsc", "onnxruntime")}}
    ih = canonical_hash(inputs)
    label = progress.stage_line(5, "validate", "smoke check with ONNX Runtime")
    if old and old.get("input_hash") == ih and old.get("status") in ("ran", "reused", "skipped"):
        rec = dict(old, status="reused" if old.get("status") != "skipped" else "skipped")
        progress.say(f"{label}: reused (graph unchanged)")
        ran["validate"] = False
        return rec, _validation_summary(rec["result"])
    progress.say(f"{label} ...")
    t0 = time.perf_counter()
    reset_peak_rss()
    result = smoke_validate(tmp, io, tokens=config.validate_tokens, prompt=prompt)
    ran["validate"] = True
    seconds = round(time.perf_counter() - t0, 2)
    if result["status"] == "skipped":
        progress.say(f"{label}: skipped ({result['reason']})")
        return ({"status": "skipped", "reason": result["reason"], "input_hash": ih,
                 "inputs": inputs, "outputs": {}, "seconds": seconds, "result": result},
                _validation_summary(result))
    if not result["passed"]:
        raise CheckFailed(f"validation (smoke) of {io['onnx']} failed: "
                          f"{'; '.join(result['failures'])}")
    progress.say(progress.stage_line(
        5, "validate", f"smoke check passed: finite logits, {len(result['generated_tokens'])} "
        f"greedy tokens, decode = prefill to {result['kv_rel_diff']:.1e}, {seconds:.1f}s"))
    progress.detail(f"smoke: generated token ids {result['generated_tokens']}")
    return ({"status": "ran", "input_hash": ih, "inputs": inputs, "outputs": {},
             "seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "result": result},
            _validation_summary(result))


def _gate_stage(config: BuildConfig, tmp: Path, io: dict, graph: dict, tools: dict,
                progress: Progress, old: dict | None, ran: dict,
                previous: Path | None) -> tuple[dict, dict]:
    """The accuracy gate: the quantized graph against its fp16 reference, on held-out text.

    A failed gate fails the build (exit 1): OUT is left as it was. The record and
    validation.json are those `dsc validate` writes.
    """
    from dsc.models.loading import load_tokenizer
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.validate.gate import GateOptions, run_gate
    from dsc.validate.run import REFERENCE_DIR, VALIDATION_FILE, default_text, gate_summary

    ref_dir = tmp / REFERENCE_DIR
    ref_io = json.loads((ref_dir / IO_SPEC).read_text())
    text = default_text()
    inputs = {"graph": graph["hash"], "kind": "gate", "precision": config.quantize,
              "reference": graph_record(ref_dir, ref_io)["hash"],
              "data_sha256": canonical_hash(text), "options": asdict(GateOptions()),
              "tools": {k: tools.get(k) for k in ("dsc", "onnxruntime")}}
    ih = canonical_hash(inputs)
    label = progress.stage_line(5, "validate", f"accuracy gate ({config.quantize} vs "
                                f"{config.dtype} reference, ONNX Runtime)")
    if _reusable(old, ih, previous) and isinstance(old.get("result"), dict):
        _link(previous, tmp, old["outputs"])
        progress.say(f"{label}: reused (graph and reference unchanged)")
        ran["validate"] = False
        return _reused(old), old["result"]
    progress.say(f"{label} ...")
    t0 = time.perf_counter()
    reset_peak_rss()
    cand = OrtCausalLM(tmp / io["onnx"], io)
    ref = OrtCausalLM(ref_dir / ref_io["onnx"], ref_io)
    result = run_gate(cand, ref, load_tokenizer(tmp), text, precision=config.quantize,
                      options=GateOptions(), candidate_path=tmp / io["onnx"],
                      reference_path=ref_dir / ref_io["onnx"])
    result["candidate"] = io["onnx"]
    result["reference"] = f"{REFERENCE_DIR}/ ({config.dtype} graph before quantization)"
    ran["validate"] = True
    seconds = round(time.perf_counter() - t0, 2)
    p = result["perplexity"]
    # A failed gate's record is written too: `build` keeps the rejected artifact as evidence.
    (tmp / VALIDATION_FILE).write_text(json.dumps(result, indent=2) + "\n")
    progress.say(progress.stage_line(
        5, "validate", f"accuracy gate {'passed' if result['passed'] else 'FAILED'}: "
        f"perplexity {p['delta']:+.2%}, top-1 {result['prefill']['top1']:.3f}, cosine p01 "
        f"{result['prefill']['cosine_p01']:.4f}, {seconds:.1f}s"))
    summary = gate_summary(result)
    rec = {"status": "ran", "input_hash": ih, "inputs": inputs,
           "outputs": {VALIDATION_FILE: sha256_file(tmp / VALIDATION_FILE)},
           "seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "result": summary}
    return rec, summary


def _rejected_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.rejected")


def _keep_rejected(tmp: Path, output: Path) -> str:
    """Move the artifact a failed gate rejected to OUT.rejected (replacing an earlier rejected
    artifact, never anything else); returns the clause the error line ends with."""
    rejected = _rejected_path(output)
    if rejected.exists() or rejected.is_symlink():
        if rejected.is_symlink() or not rejected.is_dir() or not is_artifact(rejected):
            return (f"the rejected artifact was not kept ({rejected} exists and is not a dsc "
                    f"artifact)")
        shutil.rmtree(rejected)
    os.replace(tmp, rejected)
    return f"the rejected artifact, with its report, is at {rejected}"


def _gate_failure(precision: str | None, summary: dict, kept: str) -> str:
    """The error line of a failed gate: the failing metrics, where the error jumps, the evidence."""
    fd = summary.get("first_divergence") or {}
    where = f"; first divergence at layer {fd['layer']} ({fd['module']})" if fd else ""
    return (f"accuracy gate ({precision}) failed: {'; '.join(summary['failures'])}{where}; "
            f"{kept}")


def _validation_summary(result: dict) -> dict:
    keys = ("kind", "status", "passed", "reason", "backend", "graph", "dtype", "prompt_tokens",
            "generated_tokens", "text", "finite", "kv_rel_diff", "greedy_agreement", "note")
    return {k: result[k] for k in keys if k in result}


def _carry_downstream(previous: Path | None, old: dict, tmp: Path, manifest: dict,
                      graph: dict) -> None:
    """Keep `dsc validate` / `dsc bench` records of the same graph (same graph hash)."""
    if previous is None or (old.get("graph") or {}).get("hash") != graph["hash"]:
        return
    produced = set(hash_tree(tmp)) | {BUILD_LOG, *REPORTS}
    extra = [rel for rel in (old.get("outputs") or {})
             if rel not in produced and not rel.startswith("engines/")
             and (previous / rel).is_file()]
    _link(previous, tmp, extra)
    gate = old.get("validation")
    if isinstance(gate, dict) and gate.get("kind") == "gate":
        manifest["validation"] = gate
    for key in DOWNSTREAM_KEYS:
        if key in old:
            manifest[key] = old[key]


# --- dsc compile ----------------------------------------------------------------------------

# What `dsc compile` takes from the options `dsc build` recorded, unless given again: the device
# build then matches the preflight and the trtexec.sh written where the artifact was made.
INHERITED = ("overrides", "max_batch", "max_input_len", "max_kv", "max_num_tokens", "dla_core")


def _inherit(config: BuildConfig, recorded: dict) -> BuildConfig:
    from dataclasses import replace

    changes = {}
    for key in INHERITED:
        if getattr(config, key) in (None, ()) and recorded.get(key) not in (None, [], ()):
            value = recorded[key]
            changes[key] = tuple(value) if isinstance(value, list) else value
    return replace(config, **changes) if changes else config



def _graph_of(io: dict, listed: dict) -> dict:
    """`graph_record` of a verified artifact, from its manifest's hashes (no second read)."""
    onnx_name = str(io["onnx"])
    files = {n: listed[n] for n in (onnx_name, f"{onnx_name}.data", IO_SPEC) if n in listed}
    return {"onnx": onnx_name, "dtype": io.get("dtype"), "opset": io.get("opset"),
            "files": files, "hash": canonical_hash(files)}


def compile_artifact(artifact: str | Path, config: BuildConfig, *, quiet: bool = False,
                     echo=None) -> BuildOutcome:
    """Build engines (or preflights) for more profiles into an existing artifact, atomically."""
    from dsc.pipeline.targets import resolve_targets

    t_start = time.perf_counter()
    artifact = Path(artifact)
    old = load_manifest(artifact)
    listed = old.get("outputs", {})
    # Only a verified artifact is compiled (schema problems aside: records another tool wrote
    # are kept as they are, below); its graph record then follows from the verified hashes.
    problems = [(f, why) for f, why in verify_artifact(artifact).problems
                if not (f == MANIFEST and why.startswith("schema:"))]
    if problems:
        rel, why = problems[0]
        raise CheckFailed(f"{artifact}: {rel} does not match manifest.json ({why}); dsc compile "
                          f"builds only a verified artifact (dsc verify {artifact})")
    io = load_io_spec(artifact)
    try:
        model_config = json.loads((artifact / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"artifact {artifact} has no readable config.json: {e}") from None
    dtype = str(io.get("dtype", "fp16"))
    inherited = _inherit(config, old.get("options") or {})
    dla_inherited = inherited.dla_core is not None and config.dla_core is None
    config = inherited
    targets = resolve_targets(
        config.profiles, model_config=model_config,
        model_name=old.get("source", {}).get("checkpoint", str(artifact)).rstrip("/")
        .split("/")[-1], dtype=dtype, overrides=list(config.overrides),
        max_batch=config.max_batch, max_input_len=config.max_input_len, max_kv=config.max_kv,
        max_num_tokens=config.max_num_tokens, backend=config.backend, dla_core=config.dla_core, dla_required=not dla_inherited,
        quantize=io.get("quantization"), weight_precisions=io.get("vocab_quantization") or {})
    graph = _graph_of(io, listed)
    tools = tool_versions()
    names = {t.name for t in targets}
    progress = Progress(1, quiet=quiet, echo=echo)
    progress.say(f"dsc compile {artifact}: profiles {', '.join(sorted(names))}")
    ran: dict[str, bool] = {}
    reuse_from = None if config.rebuild else old
    try:
        with atomic_dir(artifact, force=True) as tmp:
            keep = [rel for rel in listed
                    if rel not in (BUILD_LOG, *REPORTS)
                    and not any(rel.startswith(f"engines/{n}/") for n in names)
                    and (artifact / rel).is_file()]
            _link(artifact, tmp, keep)
            records, entries = _compile_stage(targets, tmp, io, graph, tools, progress, 1,
                                              artifact, reuse_from or {}, ran)
            if not any(ran.values()):
                raise _UpToDate()
            manifest = json.loads(json.dumps(old))
            manifest.update(created=now(), command="compile")
            manifest["tools"] = {**old.get("tools", {}), **tools}
            manifest["graph"] = graph  # the graph just compiled (checked against outputs)
            stage = manifest.setdefault("stages", {}).setdefault(
                "compile", {"status": "ran", "profiles": {}})
            stage.setdefault("profiles", {}).update(records)
            stage["status"] = _aggregate(stage["profiles"])
            manifest.setdefault("profiles", {}).update(entries)
            # build.log keeps the earlier runs (it was not linked: it is rewritten here).
            if (artifact / BUILD_LOG).is_file():
                earlier = (artifact / BUILD_LOG).read_text().rstrip("\n")
                progress.lines = [earlier, f"== dsc compile at {now()}", *progress.lines]
            old_errors = schema_errors(old)
            if old_errors:
                # Records another tool wrote are kept as they are, not repaired or refused.
                progress.say(f"note: {MANIFEST} did not match the schema before this compile "
                             f"({old_errors[0]}); its records are kept unchanged")
            _finish(tmp, artifact, manifest, progress, check=not old_errors)
    except _UpToDate:
        progress.say(f"{artifact}: up to date, nothing rebuilt")
        return BuildOutcome(artifact, "compile", True, time.perf_counter() - t_start,
                            load_manifest(artifact), ran)
    return BuildOutcome(artifact, "compile", False, time.perf_counter() - t_start, manifest, ran)


__all__ = ["BuildConfig", "BuildOutcome", "__version__", "build", "compile_artifact"]
