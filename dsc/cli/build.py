"""`dsc build`, `dsc compile`, `dsc inspect`, `dsc verify`: map flags onto `dsc.api`.

`--triton` on `dsc build` also writes a Triton model repository (`dsc.api.triton`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from dsc.cli.options import (
    PATH,
    allow_pickle_option,
    envelope_options,
    export_options,
    force_option,
    json_option,
    quant_options,
)


def _merged(params: dict, allowed: tuple[str, ...] | None = None) -> dict:
    """CLI values over the config file's (only flags the user actually gave win)."""
    from dsc import api

    ctx = click.get_current_context()
    explicit = {
        name
        for name in params
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    }
    values = dict(params)
    values["profiles"] = tuple(params.get("profiles") or ())
    values["overrides"] = tuple(params.get("overrides") or ())
    _to_config_names(values, explicit)
    path = params.get("config_path")
    if path is None:
        return values
    if "profiles" in explicit and not values["profiles"]:
        explicit.discard("profiles")
    return api.merge_config_file(path, values, explicit, allowed=allowed)


def _split(values) -> tuple[str, ...]:
    return tuple(p.strip() for v in (values or ()) for p in str(v).split(",") if p.strip())


# CLI parameter -> BuildConfig field / dsc.yaml key (the quantize flags are shared with
# `dsc quantize`, where the names are short).
_RENAMES = {"method": "calib_method", "samples": "calib_samples", "seq_len": "calib_seq_len"}


def _to_config_names(values: dict, explicit: set[str]) -> None:
    """Rename CLI parameters to config names in place (values and the explicit set)."""
    from dsc import api

    flags = ("int8", "fp8", "int4_awq")
    if any(k in values for k in flags):
        chosen = api.quantize_precision(*(bool(values.pop(k, False)) for k in flags))
        values["quantize"] = chosen
        if chosen is not None:
            explicit.add("quantize")
    for old, new in _RENAMES.items():
        if old in values:
            values[new] = values.pop(old)
            if old in explicit:
                explicit.add(new)
    for k in ("passes", "disable_passes", "exclude"):
        if k in values:
            values[k] = _split(values[k])
    if values.get("calib") is not None:
        values["calib"] = str(values["calib"])


def _config(values: dict):
    from dsc import api

    return api.build_config(**values)


def _emit(outcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.to_json(), indent=2))
    else:
        click.echo(outcome.format())


@click.command()
@click.argument("checkpoint", type=PATH, required=False)
@click.option("-o", "--output", type=PATH, default=None, help="Artifact directory.")
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp16",
    show_default=True,
    help="Precision of the exported graph (and engine).",
)
@export_options
@click.option(
    "--validate",
    type=click.Choice(["auto", "smoke", "gate", "none"]),
    default="auto",
    show_default=True,
    help="Validate stage: gate = quantized graph vs its fp16 reference on held-out "
    "text (fails the build when over budget); smoke = finite logits, greedy "
    "decode, KV cache; auto = gate when quantizing, else smoke.",
)
@click.option(
    "--validate-tokens",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Greedy tokens the smoke check decodes.",
)
@allow_pickle_option
@force_option("Replace an artifact of another checkpoint at OUTPUT.")
@click.option(
    "--optimize/--no-optimize",
    default=True,
    show_default=True,
    help="Run the graph passes (cleanup, fusions) before quantizing and compiling.",
)
@click.option(
    "--passes",
    "passes",
    multiple=True,
    metavar="A,B",
    help="Run only these passes, in this order (default: the pipeline; `dsc passes list`).",
)
@click.option(
    "--disable-pass",
    "disable_passes",
    multiple=True,
    metavar="NAME",
    help="Leave this pass out of the pipeline (repeatable).",
)
@quant_options
@envelope_options
@click.option(
    "--triton",
    "triton",
    is_flag=True,
    help="Also write a Triton model repository for the built engines to OUTPUT.triton/.",
)
def build(checkpoint: Path | None, triton: bool, **params) -> None:
    """Build CHECKPOINT into an artifact with one TensorRT engine per hardware profile.

    Stages: export, optimize, quantize, compile, validate; a stage whose inputs did not change
    since the artifact at OUTPUT was written is reused. Engines for GPUs TensorRT-RTX can
    target (T4, A100, A6000, RTX 4090, L4, L40S) are built here without a GPU; for the others
    (H100/H200, Jetson Orin) a preflight compile runs here and `dsc compile` finishes the
    engine on the device.
    """
    from dsc import api

    if triton and params.get("output") is None:
        raise click.UsageError("--triton needs -o OUTPUT on the command line")
    values = _merged(dict(params, checkpoint=checkpoint))
    if values.get("checkpoint") is None:
        raise click.UsageError("missing CHECKPOINT (or `checkpoint:` in --config)")
    if values.get("output") is None:
        raise click.UsageError("missing -o/--output (or `output:` in --config)")
    # --json keeps stderr quiet too (progress lines and bars), as --quiet does.
    quiet = values["quiet"] or values["as_json"]
    outcome = api.build(values["checkpoint"], values["output"], _config(values), quiet=quiet)
    _emit(outcome, values["as_json"])
    if triton:
        out = Path(str(params["output"]).rstrip("/") + ".triton")
        r = api.triton(params["output"], out, force=True)
        err = bool(params.get("as_json"))  # keep stdout the build's JSON
        click.echo(f"triton repository: {r.path} (models: {', '.join(r.models)})", err=err)
        click.echo(f"start: {r.command}", err=err)


@click.command(name="compile")
@click.argument("artifact", type=PATH)
@envelope_options
def compile_(artifact: Path, **params) -> None:
    """Build the engine for PROFILE(s) into ARTIFACT (from dsc export or dsc build).

    On a Jetson or H100 with standard TensorRT this builds the engine `dsc build` could only
    preflight; elsewhere it does what `dsc build` does for those profiles.
    """
    from dsc import api

    values = _merged(params, allowed=api.compile_keys())
    quiet = values["quiet"] or values["as_json"]
    outcome = api.compile_artifact(artifact, _config(values), quiet=quiet)
    _emit(outcome, values["as_json"])


@click.command()
@click.argument("artifact", type=PATH)
@json_option("Print the summary as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Summarise ARTIFACT: model, graph, stages, engines per profile, validation, files."""
    from dsc import api
    from dsc.manifest import format_inspect

    summary = api.inspect_artifact(artifact)
    click.echo(json.dumps(summary, indent=2) if as_json else format_inspect(summary))


@click.command()
@click.argument("artifact", type=PATH)
@click.option(
    "--inputs",
    "check_inputs",
    is_flag=True,
    help="Also re-hash the source checkpoint files recorded in the manifest.",
)
@click.option(
    "--checkpoint", type=PATH, default=None, help="Where the checkpoint is now (implies --inputs)."
)
@json_option("Print the result as JSON.")
def verify(artifact: Path, check_inputs: bool, checkpoint: Path | None, as_json: bool) -> None:
    """Re-check every hash in ARTIFACT's manifest; exit 1 naming any file that differs."""
    from dsc import api

    result = api.verify_artifact(artifact, check_inputs=check_inputs, checkpoint=checkpoint)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        for rel, problem in result.problems:
            click.echo(f"MISMATCH {rel}: {problem}")
        if result.ok:
            extra = (
                f" and {result.inputs_checked} checkpoint files" if result.inputs_checked else ""
            )
            click.echo(f"OK: {result.checked} files{extra} match {artifact}/manifest.json")
    api.check_verified(result)


COMMANDS = (build, compile_, inspect, verify)
