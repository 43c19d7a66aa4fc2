"""The library entry point: one function per `dsc` command; the CLI (`dsc.cli`) calls these only.

| command | function | returns |
|---|---|---|
| `dsc export` | `export` | `ExportResult` |
| `dsc run` | `run` | `str` |
| `dsc build` | `build` (`build_config`, `merge_config_file`) | `dsc.outcome.BuildOutcome` |
| `dsc compile` | `compile_artifact` | `dsc.outcome.BuildOutcome` |
| `dsc inspect` | `inspect_artifact` | `dict` |
| `dsc verify` | `verify_artifact` | `dsc.manifest.VerifyResult` |
| `dsc optimize` | `optimize` | `dsc.stages.optimize.OptimizeResult` |
| `dsc passes list` | `list_passes` | `PassList` |
| `dsc quantize` | `quantize` (`quantize_precision`) | `dsc.stages.quantize.QuantizeResult` |
| `dsc validate` | `validate` | `dict` (validation.json) |
| `dsc bench` | `bench` | `dict` (bench.json) |
| `dsc report` | `report` | `dict` |
| `dsc profiles list/show` | `list_profiles`, `show_profile` | `HardwareProfile` |
| `dsc plan` | `plan`, `plan_all` | `PlanOutcome`, `list[PlanResult or Skipped]` |
| `dsc device-check` | `device_check` | `dict` |
| `dsc triton` | `triton` | `dsc.runtime.triton.RepositoryResult` |
| `dsc matrix` | `matrix`, `matrix_plan` | `dict` |

Every function validates its input before heavy work, raises `dsc.errors.DscError` subclasses
for anything the user can fix (each with its exit code: `UsageError` 2, `BadInput` 3,
`Unsupported` 4, `CheckFailed` 1, `DoesNotFit` 6, ...; see `dsc.errors`), and writes output
directories atomically (`dsc.artifacts`). Heavy libraries (torch, ONNX Runtime, TensorRT) are
imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from dsc.artifacts import (
    MANIFEST,
    atomic_dir,
    check_output,
    write_json,
)
from dsc.errors import BadInput, UsageError
from dsc.manifest import tool_versions
from dsc.models.checkpoint import inspect_checkpoint
from dsc.models.loading import load_tokenizer


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the artifact directory, its graph, the model's family and shape."""

    path: Path
    onnx_path: Path
    family: str
    architecture: str
    dtype: str
    num_layers: int
    cache_kind: str
    seconds: float


def _progress(msg: str) -> None:
    print(f"[dsc] {msg}", file=sys.stderr, flush=True)


def export(
    checkpoint: str | Path,
    output: str | Path,
    *,
    dtype: str = "fp16",
    opset: int | None = None,
    external_data: bool = False,
    stream: bool = True,
    trace_layers: str = "kinds",
    allow_pickle: bool = False,
    force: bool = False,
    progress=_progress,
) -> ExportResult:
    """`dsc export`: a checkpoint to an artifact directory holding the ONNX graph and its I/O spec.

    `checkpoint`: a Hugging Face checkpoint directory (or hub id resolved in the local cache);
    `output`: the artifact directory, written atomically. `dtype`: "fp32", "fp16" or "bf16" (of
    the graph's weights and logits); `opset`: 18..23 (None: the exporter's). `external_data`:
    always write the weights to `model.onnx.data` (they go there anyway at 1.5 GiB and above).
    `stream`: trace on fake tensors and write each weight from the checkpoint when the writer
    reaches it (`dsc.export.streaming`; pickle checkpoints are always loaded whole).
    `trace_layers` (streaming): "kinds" traces one decoder layer of each kind and copies it for
    the others (`dsc.export.by_kind`), "all" traces every layer; the same graph either way.
    `progress`: called with one line per step (default: stderr).

    Raises `UsageError` (exit 2) for a bad dtype/opset, `BadInput` / `CheckpointError` (exit 3)
    for an unreadable checkpoint or an OUTPUT that is not a dsc artifact (without `force`),
    `Unsupported` (exit 4) for an architecture no family covers."""
    import concurrent.futures
    import threading

    from dsc.build_config import TRACE_LAYERS
    from dsc.manifest import checkpoint_hashes, export_manifest
    from dsc.precision import GRAPH_DTYPES
    from dsc.stages.export import ExportStage

    if dtype not in GRAPH_DTYPES:
        raise UsageError(f"unsupported export dtype {dtype!r}; choose fp32, fp16 or bf16")
    if trace_layers not in TRACE_LAYERS:
        raise UsageError(f"unknown trace_layers {trace_layers!r}; choose kinds or all")
    if opset is not None and not 18 <= opset <= 23:
        raise UsageError(f"opset {opset} is not supported by the exporter; choose 18..23")
    info = inspect_checkpoint(checkpoint, allow_pickle=allow_pickle)
    output = Path(output)
    check_output(output, force=force)  # before any output, so a refusal is the only line
    progress(f"checked {info.path}: {info.architecture} → family {info.family.name}")
    stage = ExportStage()
    tools = tool_versions()
    # The checkpoint's sha256 (the export's input record) is computed on a second thread while
    # the export runs: file reads and hashlib release the GIL, and the export leaves a core
    # idle for most of its trace (3.5 GB at 1.5B, about 2 s on this host's one core).
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsc-hash-checkpoint")
    try:
        inputs = stage.inputs(
            info,
            dtype=dtype,
            opset=opset,
            tools=tools,
            external_data=external_data,
            stream=stream,
            trace_layers=trace_layers,
            checkpoint=pool.submit(checkpoint_hashes, info, stop),
        )
        with atomic_dir(output, force=force) as tmp:
            record, graph = stage.run(info, tmp, inputs, progress=progress, hash_external_data=True)
            io = dict(graph.io_spec, dtype=dtype)
            progress("hashing outputs")
            known = {}
            if graph.external_data_sha256 is not None:  # hashed while the range check ran
                known[graph.external_data.relative_to(tmp).as_posix()] = graph.external_data_sha256
            manifest = export_manifest(info, tmp, io, record.to_json(), tools=tools, known=known)
            write_json(tmp / MANIFEST, manifest)
    finally:
        stop.set()  # an export that failed does not wait for the whole checkpoint's hash
        pool.shutdown(wait=True)
    progress(f"artifact written to {output}")
    return ExportResult(
        path=output,
        onnx_path=output / graph.onnx_path.name,
        family=info.family.name,
        architecture=info.architecture,
        dtype=dtype,
        num_layers=io["cache"]["num_layers"],
        cache_kind=io["cache"]["kind"],
        seconds=graph.seconds,
    )


def run(
    artifact: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """`dsc run`: `prompt` followed by its continuation through the artifact's ONNX graph.

    `max_new_tokens`: at most this many new tokens (stops at EOS); `greedy`: argmax, else
    sampling at `temperature` (> 0) seeded by `seed` (>= 0). Returns the text (prompt included).
    Raises `UsageError` (exit 2) for a bad temperature/seed, `BadInput` (exit 3) for an artifact
    that is not one or a prompt that encodes to no tokens."""
    import math

    from dsc.backends.onnxruntime.segmented import artifact_runner

    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"temperature must be a positive number, got {temperature}")
    if seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed}")
    runner = artifact_runner(Path(artifact))  # one layer at a time above 1 GiB of weights
    tok = load_tokenizer(artifact)
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise BadInput("the prompt encodes to no tokens")
    eos = runner.io.get("eos_token_id")
    new = runner.generate(
        [ids],
        max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        seed=seed,
        eos_token_id=eos if isinstance(eos, int) else None,
    )[0]
    return prompt + tok.decode(new, skip_special_tokens=True)


# --- dsc build / compile / inspect / verify (dsc.build, dsc.manifest) ---------------------------


def build(
    checkpoint: str | Path,
    output: str | Path,
    config=None,
    *,
    quiet: bool = False,
    echo=None,
    **options,
):
    """`dsc build`: export → (passes) → (quantize) → compile per profile → validate, with reuse.

    `config` is a `dsc.build_config.BuildConfig` (or pass its fields as keyword arguments);
    `quiet`: no progress lines; `echo`: where progress lines go (default: stderr).
    Returns a `dsc.outcome.BuildOutcome` (`to_json()` is the `--json` document).
    Raises `UsageError` (exit 2) for contradictory options, `BadInput` (exit 3) for a bad
    checkpoint/profile/config, `Unsupported` (exit 4) for a precision or target the profile
    cannot run, `CheckFailed` (exit 1) when the smoke check or the accuracy gate fails (a
    rejected artifact is kept as evidence), `DoesNotFit` (exit 6) when the plan does not fit.
    """
    from dsc.build import BuildConfig
    from dsc.build import build as run_build

    config = config or BuildConfig(**options)
    return run_build(checkpoint, output, config, quiet=quiet, echo=echo)


def compile_artifact(
    artifact: str | Path, config=None, *, quiet: bool = False, echo=None, **options
):
    """`dsc compile`: engines (or preflights) for more profiles, into an existing artifact.

    `config`: a `BuildConfig` (only its profile and envelope fields count). Returns a
    `dsc.outcome.BuildOutcome`; raises as `build` does."""
    from dsc.build import BuildConfig
    from dsc.build import compile_artifact as run_compile

    config = config or BuildConfig(**options)
    return run_compile(artifact, config, quiet=quiet, echo=echo)


def build_config(**values):
    """A `dsc.build_config.BuildConfig` from `values` (keys that are not its fields ignored).

    Raises `UsageError` (exit 2) / `BadInput` (exit 3) for a value it refuses."""
    from dsc.build_config import BuildConfig

    keys = set(BuildConfig.keys())
    return BuildConfig(**{k: v for k, v in values.items() if k in keys})


def merge_config_file(
    path: str | Path, values: dict, explicit: set[str], *, allowed: tuple[str, ...] | None = None
) -> dict:
    """`values` (option name → value) over the dsc.yaml at `path`: only names in `explicit`
    (given on the command line) win over the file. `allowed`: keys of the file that count
    (None: all). Raises `BadInput` (exit 3) for an unreadable or invalid file."""
    from dsc.config_file import load_config_file, merge

    from_file = load_config_file(path)
    if allowed is not None:
        from_file = {
            k: v
            for k, v in from_file.items()
            if k in allowed or (k == "overrides" and "set" in allowed)
        }
    return merge(from_file, values, explicit)


def compile_keys() -> tuple[str, ...]:
    """The dsc.yaml keys `dsc compile` takes (the others belong to `dsc build`)."""
    from dsc.config_file import COMPILE_KEYS

    return COMPILE_KEYS


def quantize_precision(int8: bool = False, fp8: bool = False, int4_awq: bool = False) -> str | None:
    """ "int8", "fp8", "int4" or None from the three precision flags; `UsageError` (exit 2) for
    more than one."""
    from dsc.precision import precision_from_flags

    return precision_from_flags(int8, fp8, int4_awq)


def inspect_artifact(artifact: str | Path) -> dict:
    """`dsc inspect`: a summary of an artifact's manifest (model, graph, stages, engines per
    profile, validation, files; sizes in bytes). Raises `BadInput` (exit 3) for a directory
    that is not a dsc artifact."""
    from dsc.manifest import inspect_artifact as summarise

    return summarise(artifact)


def verify_artifact(
    artifact: str | Path, *, check_inputs: bool = False, checkpoint: str | Path | None = None
):
    """`dsc verify`: re-hash every file against the manifest; returns a
    `dsc.manifest.VerifyResult` (`ok`, `problems` as (file, problem) pairs). It does not raise
    for a mismatch: `check_verified` does (`CheckFailed`, exit 1). `BadInput` (exit 3) for a
    directory that is not a dsc artifact."""
    from dsc.manifest import verify_artifact as verify

    return verify(artifact, check_inputs=check_inputs, checkpoint=checkpoint)


def check_verified(result) -> None:
    """Raise `CheckFailed` (exit 1) naming the first file of a failed `verify_artifact`."""
    from dsc.manifest import raise_for_problems

    raise_for_problems(result)


# --- dsc optimize / passes list (dsc.stages.optimize, dsc.passes) -------------------------------


@dataclass(frozen=True)
class PassList:
    """The registered passes (`dsc.passes.PassInfo`: name, kind, doc) and the default pipeline."""

    pipeline: tuple[str, ...]
    passes: tuple

    def to_json(self) -> dict:
        return {
            "pipeline": list(self.pipeline),
            "passes": [{"name": p.name, "kind": p.kind, "doc": p.doc} for p in self.passes],
        }


def list_passes() -> PassList:
    """`dsc passes list`: the registered passes, in default pipeline order."""
    from dsc.passes import PIPELINE
    from dsc.passes import list_passes as registered

    return PassList(tuple(PIPELINE), tuple(registered()))


def optimize(
    artifact: str | Path,
    output: str | Path,
    *,
    profile: str | None = None,
    target_ops: str = "auto",
    mla_absorb_max_seq: int = 1,
    moe_gather: bool = True,
    only: list[str] | None = None,
    disable: list[str] = (),
    dump_after: list[str] = (),
    verify_each: bool = False,
    force: bool = False,
):
    """`dsc optimize`: the optimize stage (`dsc.stages.optimize`) on `artifact`'s graph, into
    a new artifact `output`.

    `profile`: a profile name or YAML path picking the fused ops its TensorRT parses (None:
    only ops every supported TensorRT parses); `target_ops`: "auto", "portable" or "opset23";
    `mla_absorb_max_seq`: query lengths (tokens) up to this use weight-absorbed MLA attention;
    `moe_gather`: keep the per-token expert gather for small batches; `only` / `disable`:
    pass names; `dump_after`: save the graph after these passes; `verify_each`: run ONNX
    Runtime after every pass. Returns a `dsc.stages.optimize.OptimizeResult` (path, report,
    coverage, seconds). Raises `BadInput` (exit 3) for an unknown pass or profile, an OUTPUT
    that is the input or not a dsc artifact (without `force`); `CheckFailed` (exit 1) when
    `verify_each` finds a pass that changed the outputs."""
    from dsc.passes import PassOptions
    from dsc.stages.optimize import optimize_artifact

    hw = None
    if profile:
        from dsc.hardware import load_profile

        hw = load_profile(profile)
    options = PassOptions(
        target_ops=target_ops, mla_absorb_max_seq=mla_absorb_max_seq, moe_gather_decode=moe_gather
    )
    return optimize_artifact(
        artifact,
        output,
        profile=hw,
        options=options,
        only=only,
        disable=disable,
        dump_after=dump_after,
        verify_each=verify_each,
        force=force,
    )


# --- dsc quantize (dsc.stages.quantize) ---------------------------------------------------------


def check_quantize_options(
    precision: str | None, lm_head: str | None = None, embedding: str | None = None
) -> None:
    """Refuse `--quantize-lm-head` / `--quantize-embedding` choices `precision` cannot take
    (`UsageError`, exit 2)."""
    from dsc.quantize import check_vocab_options

    check_vocab_options(lm_head, embedding, precision)


def quantize(
    artifact: str | Path,
    output: str | Path,
    precision: str,
    *,
    weight_only: bool = False,
    calib: str | Path | None = None,
    method: str | None = None,
    alpha: float | None = None,
    samples: int = 64,
    seq_len: int = 128,
    exclude: tuple[str, ...] = (),
    lm_head: str | None = None,
    embedding: str | None = None,
    profile: str | None = None,
    force: bool = False,
    calibrate_by: str = "auto",
    move_input: bool = False,
):
    """`dsc quantize`: the quantize stage on `artifact`'s graph, into a new artifact `output`.

    `precision`: "int8", "fp8" or "int4" (AWQ, weight-only); `weight_only`: INT8 weights only;
    `calib`: calibration text, JSONL or directory (None: the shipped text); `method`: "max",
    "percentile", "entropy" or "mse"; `alpha`: SmoothQuant strength in [0, 1] (None: searched
    per layer); `samples` windows of `seq_len` tokens; `exclude`: globs of HF module paths kept
    in float; `lm_head` / `embedding`: store them weight-only at this precision; `profile`:
    refuse precisions that target cannot run; `calibrate_by`: "layer" (one decoder layer at a
    time), "graph" (one session) or "auto" (by size: `dsc.quantize.calibrates_by_layer`);
    `move_input`: rename the input's weights file into the new artifact's `reference/` instead
    of copying it, and remove the input artifact once the new one is complete
    (`dsc.stages.quantize.quantize_artifact`).
    Returns a `dsc.stages.quantize.QuantizeResult`.
    Raises `UsageError` (exit 2) for contradictory options, `BadInput` (exit 3) for bad
    calibration data or OUTPUT, `Unsupported` (exit 4) for a precision the profile cannot run.
    """
    from dsc.stages.quantize import quantize_artifact

    return quantize_artifact(
        artifact,
        output,
        precision,
        calib=calib,
        method=method,
        samples=samples,
        seq_len=seq_len,
        alpha=alpha,
        weight_only=weight_only,
        exclude=tuple(exclude),
        profile=profile,
        force=force,
        lm_head=lm_head,
        embedding=embedding,
        calibrate_by=calibrate_by,
        move_input=move_input,
    )


# --- dsc validate / bench / report (dsc.validate, dsc.runtime.evaluate) -------------------------


def validate(
    artifact: str | Path,
    *,
    reference: str | Path = "fp16",
    data: str | Path | None = None,
    thresholds: tuple[str, ...] = (),
    precision: str | None = None,
    windows: int = 8,
    window: int = 128,
    prompts: int = 8,
    gen_len: int = 32,
    engine: str | None = None,
    runtime: str | None = None,
    cuda_graphs: bool = True,
    quiet: bool = False,
) -> dict:
    """`dsc validate`: the accuracy gate (`dsc.stages.validate.ValidateStage.gate`) of the
    artifact's graph, or with `engine` (a profile name) of its built engine, against the
    reference; the record is written to validation.json, the manifest and the reports.

    `reference`: "fp16" (the artifact's reference/ export), an artifact directory or a .onnx
    file; `data`: held-out text file (None: the shipped held-out split); `thresholds`:
    "key=value,..." overrides; `precision`: the candidate's, for the default thresholds (None:
    from the artifact); `windows` perplexity windows of `window` tokens, `prompts` greedy
    prompts of `gen_len` new tokens; `runtime`: "tensorrt", "tensorrt_rtx" or "standin" (with
    `engine`); `cuda_graphs`: decode under CUDA graphs (with `engine`).

    Returns validation.json's document (`passed`, `failures`, `prefill` / `decode` metrics,
    `perplexity`, `greedy`, ...; see `dsc.validate.gate.run_gate`). A failed gate is
    returned, not raised (the caller raises `CheckFailed`, exit 1). Raises `UsageError` (exit 2)
    for bad thresholds, `BadInput` (exit 3) for a missing reference or data, `Unsupported`
    (exit 4) for an engine this machine cannot run."""
    from dsc.validate.gate import GateOptions, parse_thresholds

    opts = GateOptions(window=window, windows=windows, prompts=prompts, gen_len=gen_len)
    kw = {
        "reference": reference,
        "data": data,
        "thresholds": parse_thresholds(thresholds),
        "precision": precision,
        "options": opts,
        "quiet": quiet,
    }
    if engine is not None:
        from dsc.runtime.evaluate import validate_engine

        return validate_engine(artifact, engine, runtime=runtime, cuda_graphs=cuda_graphs, **kw)
    from dsc.stages.validate import validate_artifact

    return validate_artifact(artifact, **kw)


def bench(
    artifact: str | Path,
    *,
    batches: tuple[int, ...] = (1,),
    prompt_lens: tuple[int, ...] = (128,),
    gen_len: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    profile: str | None = None,
    engine: str | None = None,
    runtime: str | None = None,
    cuda_graphs: bool = True,
) -> dict:
    """`dsc bench`: latency of the artifact's graph in ONNX Runtime, or with `engine` (a
    profile name) of its built engine, over the grid `batches` × `prompt_lens` (tokens),
    decoding `gen_len` tokens after `warmup` untimed runs, `repeats` timed ones.

    Returns bench.json's document: rows with `ttft` / `tpot` percentiles in ms (`p50_ms`,
    `p90_ms`, `p99_ms`), `decode_tokens_per_s`, bytes moved; with `profile` (no engine) also
    the target's decode ceiling (`target`). With `engine`: one run per CUDA-graph setting
    (`runs`, warmup at least 2 with graphs). Raises `BadInput` (exit 3) for a bad artifact,
    `Unsupported` (exit 4) for an engine this machine cannot run."""
    if engine is not None:
        from dsc.runtime.evaluate import bench_engine

        return bench_engine(
            artifact,
            engine,
            batches=batches,
            prompt_lens=prompt_lens,
            gen_len=gen_len,
            warmup=max(warmup, 2) if cuda_graphs else warmup,
            repeats=repeats,
            runtime=runtime,
            graphs=(True, False) if cuda_graphs else (False,),
        )
    from dsc.validate.run import bench_artifact

    return bench_artifact(
        artifact,
        batches=batches,
        prompt_lens=prompt_lens,
        gen_len=gen_len,
        warmup=warmup,
        repeats=repeats,
        profile=profile,
    )


def report(artifact: str | Path) -> dict:
    """`dsc report`: regenerate report.json, report.md and report.html; returns report.json's
    document. Raises `BadInput` (exit 3) for a directory that is not a dsc artifact."""
    from dsc.validate.report import write_reports

    return write_reports(artifact)


# --- dsc profiles / plan (dsc.hardware, dsc.plan) -----------------------------------------------


def list_profiles() -> list:
    """`dsc profiles list`: the built-in `dsc.hardware.HardwareProfile`s."""
    from dsc.hardware import list_profiles as built_in

    return built_in()


def show_profile(name: str, overrides: tuple[str, ...] = ()):
    """`dsc profiles show`: the `HardwareProfile` NAME (name, alias or YAML path) after
    `overrides` ("key=value"). Raises `BadInput` (exit 3) for an unknown profile or field."""
    from dsc.hardware import load_profile

    return load_profile(name, list(overrides))


@dataclass(frozen=True)
class PlanOutcome:
    """`plan`'s answer: the `dsc.plan.PlanResult`, its remedies (`dsc.plan.Remedy`, best
    first; empty when it fits) and the profile it was planned on."""

    result: object
    remedies: list
    profile: object

    def to_json(self) -> dict:
        return {**self.result.to_dict(), "remedies": [r.to_dict() for r in self.remedies]}


def plan(
    model: str | Path,
    profile: str,
    precision: str = "fp16",
    batch: int = 1,
    context: int | None = None,
    input_len: int | None = None,
    *,
    lm_head: str | None = None,
    embedding: str | None = None,
    gpus: int = 1,
    overrides: tuple[str, ...] = (),
) -> PlanOutcome:
    """`dsc plan --profile P`: memory (bytes), verdict and speed ceilings of `model` (a
    checkpoint dir or config.json) on one target, and the remedies when it does not fit.

    `context`: KV-cache tokens per sequence (None: the envelope's max_kv, capped at the model's
    max_position_embeddings); `input_len`: prefill tokens; `lm_head` / `embedding`: count them
    quantized; `gpus`: tensor/expert parallel over N GPUs (memory per GPU). Does not raise
    when it does not fit (`result.fits` is false). Raises `BadInput` (exit 3) for an unknown
    profile or unreadable config, `Unsupported` (exit 4) for a precision the target cannot
    run, `UsageError` (exit 2) for contradictory options."""
    from dsc import plan as planner
    from dsc.hardware import load_profile

    prof = load_profile(profile, list(overrides))
    kw = {"lm_head": lm_head, "embedding": embedding, "gpus": gpus}
    result = planner.plan(model, prof, precision, batch, context, input_len, **kw)
    rems = planner.remedies(model, prof, precision, batch, context, input_len, **kw)
    return PlanOutcome(result, rems, prof)


def plan_all(
    model: str | Path,
    precision: str = "fp16",
    batch: int = 1,
    context: int | None = None,
    input_len: int | None = None,
    overrides: tuple[str, ...] = (),
) -> list:
    """`dsc plan --profile all`: one `dsc.plan.PlanResult` per built-in profile, or a
    `dsc.plan.Skipped` (profile, reason) for one it cannot plan on. Raises as `plan` does."""
    from dsc import plan as planner

    return planner.plan_all(model, precision, batch, context, input_len, list(overrides))


# --- dsc device-check / triton (dsc.runtime) ----------------------------------------------------


def device_check(
    artifact: str | Path,
    profile: str,
    *,
    runtime: str | None = None,
    window: int = 128,
    batches: tuple[int, ...] = (1,),
    prompt_lens: tuple[int, ...] = (128,),
    gen_len: int = 32,
    quiet: bool = False,
) -> dict:
    """`dsc device-check`: on the target, compile `profile`'s engine when the artifact holds
    only a preflight, gate it (windows of `window` tokens) and bench it (`batches` ×
    `prompt_lens` tokens, `gen_len` new tokens); manifest and report updated.

    Returns {"compiled": bool, "validation": gate record, "bench": bench record}. Raises
    `CheckFailed` (exit 1) when the gate fails, `Unsupported` (exit 4) when this machine
    cannot run or build the engine, `BadInput` (exit 3) for an unknown profile."""
    from dsc.runtime.evaluate import device_check as run_device_check
    from dsc.validate.gate import GateOptions

    return run_device_check(
        artifact,
        profile,
        runtime=runtime,
        quiet=quiet,
        validate_options={"options": GateOptions(window=window)},
        bench_options={"batches": batches, "prompt_lens": prompt_lens, "gen_len": gen_len},
    )


def triton(
    artifact: str | Path,
    output: str | Path,
    *,
    profiles: tuple[str, ...] | None = None,
    force: bool = False,
):
    """`dsc triton`: a Triton model repository at `output` serving the engines of `profiles`
    (None: every built engine). Returns a `dsc.runtime.triton.RepositoryResult` (path,
    models, the tritonserver command). Raises `BadInput` (exit 3) for an artifact without
    engines or an OUTPUT that exists (without `force`)."""
    from dsc.runtime.triton import write_repository

    return write_repository(artifact, output, profiles=profiles or None, force=force)


# --- dsc matrix (dsc.matrix) --------------------------------------------------------------------


def matrix_plan(matrix_file: str | Path, output: str | Path) -> dict:
    """`dsc matrix --plan`: the cells of MATRIX_FILE and their `dsc build` command lines
    ({"matrix", "cells": [{"model", "precision", "command", "skipped_profiles"}, ...]}).
    Raises `BadInput` (exit 3) for an invalid matrix file."""
    from dsc.matrix.run import plan_json
    from dsc.matrix.spec import load_matrix

    return plan_json(load_matrix(matrix_file), Path(output))


def matrix(
    matrix_file: str | Path,
    output: str | Path,
    *,
    executor: str = "local",
    address: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> dict:
    """`dsc matrix`: build every (model, precision) of MATRIX_FILE for every legal profile,
    sharing stages, with `executor` "local" (`workers` processes) or "ray" (the cluster at
    `address`). Returns the summary document (`cells`, `failed`, ...); a failed cell is
    reported, not raised (`check_matrix` raises). Raises `BadInput` (exit 3) for an invalid
    matrix file, `Unsupported` (exit 4) when Ray is not installed."""
    import contextlib

    from dsc.matrix.run import run_matrix
    from dsc.matrix.spec import load_matrix

    m = load_matrix(matrix_file)
    if executor == "ray":
        from dsc.matrix.executors import RayExecutor

        ex = RayExecutor(address)
    else:
        from dsc.matrix.executors import LocalExecutor

        ex = LocalExecutor(workers)
    # Ray prints cluster events (a worker that died, ...) on stdout: stdout is the summary's.
    with contextlib.redirect_stdout(sys.stderr):
        return run_matrix(m, output, ex, quiet=quiet)


def check_matrix(doc: dict) -> None:
    """Raise `CheckFailed` (exit 1) when a cell of a `matrix` summary failed."""
    from dsc.matrix.run import check

    check(doc)
