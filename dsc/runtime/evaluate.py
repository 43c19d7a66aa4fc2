"""`dsc validate/bench ART --engine PROFILE` and `dsc device-check ART --profile P`.

validate  the accuracy gate of `dsc validate` (perplexity, KL, top-1/top-5, cosine, greedy
          agreement) with the engine of PROFILE as the candidate. The reference is the fp16
          engine of that profile when the reference artifact has one (`--reference DIR` with a
          built engine for PROFILE), else the reference graph in ONNX Runtime (the artifact's
          `reference/` fp16 export, or the artifact's own graph when it is the fp16 export).
          The layer locator, when the gate fails, compares the ONNX graph the engine was built
          from with the reference graph (an engine's inner tensors are not readable), and the
          record says so (`locator_scope`).
bench     TTFT and TPOT p50/p90/p99 and tokens/s over the batch x prompt-length grid, once with
          CUDA graphs and once without, and for each row the fraction of the profile's decode
          ceiling (`dsc plan`'s bandwidth roofline for this model, precision, batch and context)
          the measured decode tokens/s reach.

Results: `validation-engine-<profile>.json` / `bench-engine-<profile>.json` in the artifact, a
summary in manifest.json under `engine_runs.<profile>.{validation,bench}` (the file's sha256 in
`outputs`), then the reports; each file with its manifest update is written atomically
(`write_record`). Every record names the runtime: `standin` records come from ONNX Runtime on
the CPU behind the stand-in, not from TensorRT, and say so.

device-check  on the target: compile the engine if the profile holds only a preflight
          (`dsc compile`'s build), then validate, then bench; exit 1 when the gate fails.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dsc import signals
from dsc.artifacts import MANIFEST, load_io_spec, load_manifest
from dsc.errors import BadInput, CheckFailed, DscError
from dsc.models.checkpoint import sha256_file

logger = logging.getLogger(__name__)


def validation_file(profile: str) -> str:
    return f"validation-engine-{profile}.json"


def bench_file(profile: str) -> str:
    return f"bench-engine-{profile}.json"


def write_record(
    artifact: Path,
    profile: str,
    kind: str,
    filename: str,
    data: dict,
    summary: dict,
    *,
    reports: bool = True,
) -> None:
    """Write `filename` and set manifest `engine_runs.<profile>.<kind>` to `summary` (with the
    file's sha256 in `outputs`): both or neither, then regenerate the reports."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    path = artifact / filename
    with signals.deferred():
        tmp = path.with_name(f".{filename}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        runs = manifest.setdefault("engine_runs", {})
        runs.setdefault(profile, {})[kind] = summary
        manifest.setdefault("outputs", {})[filename] = sha256_file(path)
        mtmp = artifact / f".{MANIFEST}.tmp"
        mtmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(mtmp, artifact / MANIFEST)
    if reports:
        from dsc.validate.report import write_reports

        write_reports(artifact)


def _reference(
    artifact: Path, reference: str | Path, profile: str, runtime: str | None, cuda_graphs: bool
):
    """(runner factory, onnx path, description) of the reference."""
    from dsc.backends.onnxruntime.segmented import causal_lm
    from dsc.runtime.engine import engine_factory
    from dsc.validate.run import resolve_reference

    ref_dir = Path(reference) if str(reference) != "fp16" else None
    if ref_dir is not None and ref_dir.is_dir():
        entry = (load_manifest(ref_dir).get("profiles") or {}).get(profile)
        if isinstance(entry, dict) and isinstance(entry.get("engine"), dict):
            io = load_io_spec(ref_dir)
            make = engine_factory(ref_dir, profile, runtime=runtime, cuda_graphs=cuda_graphs)
            return make, ref_dir / io["onnx"], f"{ref_dir} engine {profile} ({make.runtime.label})"
    path, io, desc = resolve_reference(artifact, reference)
    return (lambda: causal_lm(path, io)), path, f"{desc} in ONNX Runtime"


def validate_engine(
    artifact: str | Path,
    profile: str,
    *,
    reference: str | Path = "fp16",
    data: str | Path | None = None,
    thresholds: dict | None = None,
    precision: str | None = None,
    options=None,
    runtime: str | None = None,
    cuda_graphs: bool = True,
    write: bool = True,
    quiet: bool = False,
) -> dict:
    """The accuracy gate with the engine of `profile` as candidate; returns the gate record
    (validation.json's fields, plus `engine`, `runtime`, `graph_stats`, `locator_scope`).

    Raises `Unsupported` (exit 4) without a GPU/runtime or for an engine of another SM or
    version, `BadInput` (exit 3) for a missing profile or unreadable engine."""
    from dsc.models.loading import load_tokenizer
    from dsc.runtime.engine import engine_factory
    from dsc.validate.gate import GateOptions, run_gate
    from dsc.validate.run import candidate_precision, read_validation_text

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    # checked now (GPU, runtime, SM, version); each runner is made when the gate gets to it and
    # dropped after, so engine and reference are never resident together
    make = engine_factory(artifact, profile, runtime=runtime, cuda_graphs=cuda_graphs)
    text = read_validation_text(data)
    ref, ref_path, ref_desc = _reference(artifact, reference, profile, runtime, cuda_graphs)
    opts = options or GateOptions()
    if thresholds:
        opts.thresholds = dict(thresholds)
    prec = precision or candidate_precision(artifact, manifest, io)
    result = run_gate(
        make,
        ref,
        load_tokenizer(artifact),
        text,
        precision=prec,
        options=opts,
        candidate_path=artifact / io["onnx"],
        reference_path=ref_path,
        quiet=quiet,
    ).to_json()
    engine = manifest["profiles"][profile]["engine"]
    result["candidate"] = f"{engine['path']} ({make.runtime.label})"
    result["reference"] = ref_desc
    result["engine"] = {
        "profile": profile,
        "path": engine["path"],
        "sha256": engine["sha256"],
        "backend": engine.get("backend"),
        "trt_version": engine.get("trt_version"),
    }
    result["runtime"] = make.runtime.label
    result["cuda_graphs"] = cuda_graphs
    result["graph_stats"] = make.last.graph_stats.to_json() if make.last else None
    result["locator_scope"] = (
        "the ONNX graph the engine was built from against the reference "
        "graph, in ONNX Runtime (an engine's inner tensors are not read)"
    )
    if write:
        summary = {k: result[k] for k in ("precision", "passed", "failures", "runtime")}
        summary["perplexity_delta"] = result["perplexity"]["delta"]
        summary["top1_prefill"] = result["prefill"]["top1"]
        write_record(artifact, profile, "validation", validation_file(profile), result, summary)
    return result


def bench_engine(
    artifact: str | Path,
    profile: str,
    *,
    batches=(1,),
    prompt_lens=(128,),
    gen_len: int = 32,
    warmup: int = 2,
    repeats: int = 5,
    runtime: str | None = None,
    graphs: tuple[bool, ...] = (True, False),
    write: bool = True,
) -> dict:
    """Time the engine of `profile` with and without CUDA graphs (`graphs`).

    Returns {"runtime", "profile", "runs": [{"cuda_graphs", "rows": [...], "graph_stats"}]}
    where each row is `dsc.validate.bench.bench`'s (ms, tokens/s, bytes) plus
    `decode_ceiling_tokens_per_s` (dsc plan's bandwidth roofline for the profile, this batch
    and context prompt_len + gen_len) and `fraction_of_roofline` (measured / ceiling). With
    graphs, a (batch, past) signature is captured on its second run and replayed from its
    third, so `warmup` >= 2 times only replays. Errors as `validate_engine`."""
    from dsc.runtime.engine import EngineCausalLM
    from dsc.validate.bench import bench

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    ceilings = _ceilings(artifact, manifest, io, profile, batches, prompt_lens, gen_len)
    runs, label = [], None
    for use in graphs:
        runner = EngineCausalLM.from_artifact(artifact, profile, runtime=runtime, cuda_graphs=use)
        label = runner.runtime.label
        r = bench(
            runner,
            onnx_path=artifact / io["onnx"],
            batches=batches,
            prompt_lens=prompt_lens,
            gen_len=gen_len,
            warmup=warmup,
            repeats=repeats,
        )
        for row in r["rows"]:
            ceiling = ceilings.get((row["batch"], row["prompt_len"]))
            row["decode_ceiling_tokens_per_s"] = ceiling
            row["fraction_of_roofline"] = row["decode_tokens_per_s"] / ceiling if ceiling else None
        runs.append(
            {"cuda_graphs": use, "rows": r["rows"], "graph_stats": runner.graph_stats.to_json()}
        )
    result = {
        "kind": "engine-bench",
        "profile": profile,
        "runtime": label,
        "engine": manifest["profiles"][profile]["engine"]["path"],
        "weight_bytes": r["weight_bytes"],
        "kv_bytes_per_token": r["kv_bytes_per_token"],
        "runs": runs,
    }
    if runtime == "standin" or (label or "").startswith("standin"):
        result["note"] = (
            "timed through the stand-in runtime (ONNX Runtime on this CPU): not "
            "TensorRT, and the roofline fractions say nothing about the GPU"
        )
    if write:
        summary = {
            "runtime": label,
            "rows": [
                {
                    "cuda_graphs": run["cuda_graphs"],
                    "batch": row["batch"],
                    "prompt_len": row["prompt_len"],
                    "ttft_p50_ms": row["ttft"]["p50_ms"],
                    "tpot_p50_ms": row["tpot"]["p50_ms"],
                    "decode_tokens_per_s": row["decode_tokens_per_s"],
                    "fraction_of_roofline": row["fraction_of_roofline"],
                }
                for run in runs
                for row in run["rows"]
            ],
        }
        write_record(artifact, profile, "bench", bench_file(profile), result, summary)
    return result


def _ceilings(
    artifact: Path, manifest: dict, io: dict, profile: str, batches, prompt_lens, gen_len: int
) -> dict:
    """(batch, prompt_len) -> dsc plan's decode tokens/s ceiling on the profile's hardware."""
    from dsc.hardware import load_profile
    from dsc.plan import plan
    from dsc.validate.run import candidate_precision

    rec = (manifest.get("profiles") or {}).get(profile) or {}
    name = (rec.get("profile") or {}).get("name") or profile
    try:
        prof = load_profile(name)
    except DscError as e:  # a profile file that moved: the timings stand without a ceiling
        logger.warning("no roofline for %s: %s", name, e)
        return {}
    precision = candidate_precision(artifact, manifest, io)
    if precision == "fp32":
        precision = "fp16"
    out = {}
    for b in batches:
        for length in prompt_lens:
            p = plan(artifact / "config.json", prof, precision, batch=b, context=length + gen_len)
            out[(b, length)] = p.decode_tokens_per_s
    return out


def device_check(
    artifact: str | Path,
    profile: str,
    *,
    runtime: str | None = None,
    validate_options: dict | None = None,
    bench_options: dict | None = None,
    quiet: bool = False,
    echo=None,
) -> dict:
    """Compile (when the profile holds only a preflight), validate and bench on this device.

    Returns {"compiled": bool, "validation": gate record, "bench": bench record}; raises
    `CheckFailed` (exit 1) when the gate fails (after recording it), and the errors of
    `validate_engine` / `dsc compile`."""
    from dsc.pipeline.progress import Progress

    artifact = Path(artifact)
    progress = Progress(3, echo=echo, quiet=quiet)
    manifest = load_manifest(artifact)
    rec = (manifest.get("profiles") or {}).get(profile)
    if not isinstance(rec, dict):
        known = ", ".join(sorted(manifest.get("profiles") or {})) or "none"
        raise BadInput(
            f"{artifact} has no profile {profile!r} (profiles: {known}); build or "
            f"compile it first: dsc compile {artifact} --profile {profile}"
        )
    compiled = False
    with progress.stage(1, "compile", f"{profile}") as note:
        if rec.get("engine") is None:
            from dsc.build import BuildConfig, compile_artifact
            from dsc.errors import Unsupported
            from dsc.runtime.engine import load_runtime, runtime_flavour

            flavour = runtime_flavour(runtime, "tensorrt")
            if flavour == "standin":
                raise Unsupported(
                    f"profile {profile} holds only a preflight and the stand-in "
                    f"runtime cannot build engines; run this on the device"
                )
            load_runtime(flavour)  # no GPU or runtime: exit 4 before any build
            compile_artifact(artifact, BuildConfig(profiles=(profile,)), quiet=True)
            rec = (load_manifest(artifact).get("profiles") or {}).get(profile) or {}
            if rec.get("engine") is None:
                raise Unsupported(
                    f"dsc compile did not build an engine for {profile} here "
                    f"(status {rec.get('status')}): this machine is not the "
                    f"profile's device"
                )
            compiled = True
        else:
            note["end"] = (
                f"engine present ({rec['engine'].get('backend')} "
                f"{rec['engine'].get('trt_version')}); not rebuilt"
            )
    with progress.stage(2, "validate", f"engine {profile} against the fp16 reference") as note:
        v = validate_engine(
            artifact, profile, runtime=runtime, quiet=quiet, **(validate_options or {})
        )
        note["end"] = (
            f"{'PASS' if v['passed'] else 'FAIL'} (perplexity {v['perplexity']['delta']:+.2%})"
        )
    with progress.stage(3, "bench", f"engine {profile}, with and without CUDA graphs") as note:
        b = bench_engine(artifact, profile, runtime=runtime, **(bench_options or {}))
        best = max(
            (row["decode_tokens_per_s"] for run in b["runs"] for row in run["rows"]), default=0.0
        )
        note["end"] = f"best decode {best:.1f} tok/s"
    if not v["passed"]:
        raise CheckFailed(f"engine {profile} failed the accuracy gate: {'; '.join(v['failures'])}")
    return {"compiled": compiled, "validation": v, "bench": b}
