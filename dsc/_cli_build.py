"""CLI commands `dsc build`, `dsc compile`, `dsc inspect`, `dsc verify`: parse, call dsc.api."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

_PATH = click.Path(path_type=Path)


def _engine_options(f):
    """Options shared by build and compile (the ones that shape an engine)."""
    opts = [
        click.option(
            "-p",
            "--profile",
            "profiles",
            multiple=True,
            help="Hardware profile(s): name, alias or .yaml path; a,b,c builds a "
            "matrix (repeatable).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help="Override a profile field for every profile, e.g. "
            "builder.workspace_gb=4 (repeatable).",
        ),
        click.option(
            "--max-batch",
            type=click.IntRange(1),
            default=None,
            help="Engine envelope: largest batch (default: the profile's).",
        ),
        click.option(
            "--max-input-len",
            type=click.IntRange(1),
            default=None,
            help="Engine envelope: longest prompt (default: the profile's, capped).",
        ),
        click.option(
            "--max-kv",
            type=click.IntRange(1),
            default=None,
            help="Engine envelope: KV-cache capacity in tokens (default: the profile's, "
            "capped at the model's max_position_embeddings).",
        ),
        click.option(
            "--max-num-tokens",
            type=click.IntRange(1),
            default=None,
            help="Engine envelope: most tokens in one prefill pass; the prefill "
            "profile's batch is max(1, this // max-input-len) (default: the "
            "profile's, 8192).",
        ),
        click.option(
            "--backend",
            type=click.Choice(["auto", "tensorrt_rtx", "tensorrt"]),
            default="auto",
            show_default=True,
            help="auto: TensorRT-RTX where it can target the GPU, else standard "
            "TensorRT on the device (preflight + trtexec command elsewhere).",
        ),
        click.option(
            "--dla-core",
            type=int,
            default=None,
            help="Jetson AGX Orin / Orin NX: build for this DLA core with GPU fallback "
            "(standard TensorRT, on the device).",
        ),
        click.option(
            "--rebuild", is_flag=True, help="Run every stage even when its inputs are unchanged."
        ),
        click.option(
            "--config",
            "config_path",
            type=_PATH,
            default=None,
            help="dsc.yaml with pinned options; flags given here override it.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print one JSON document on stdout (progress stays on stderr).",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _merged(params: dict, allowed: tuple[str, ...] | None = None) -> dict:
    """CLI values over the config file's (only flags the user actually gave win)."""
    from dsc.config_file import load_config_file, merge

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
    from_file = load_config_file(path)
    if allowed is not None:
        from_file = {
            k: v
            for k, v in from_file.items()
            if k in allowed or (k == "overrides" and "set" in allowed)
        }
    if "profiles" in explicit and not values["profiles"]:
        explicit.discard("profiles")
    return merge(from_file, values, explicit)


def _quant_options(f):
    from dsc._cli_quant import quant_options

    return quant_options(f)


def _split(values) -> tuple[str, ...]:
    return tuple(p.strip() for v in (values or ()) for p in str(v).split(",") if p.strip())


# CLI parameter -> BuildConfig field / dsc.yaml key (the quantize flags are shared with
# `dsc quantize`, where the names are short).
_RENAMES = {"method": "calib_method", "samples": "calib_samples", "seq_len": "calib_seq_len"}


def _to_config_names(values: dict, explicit: set[str]) -> None:
    """Rename CLI parameters to config names in place (values and the explicit set)."""
    from dsc.precision import precision_from_flags

    flags = ("int8", "fp8", "int4_awq")
    if any(k in values for k in flags):
        chosen = precision_from_flags(*(bool(values.pop(k, False)) for k in flags))
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
    from dsc.build_config import BuildConfig

    keys = set(BuildConfig.keys())
    return BuildConfig(**{k: v for k, v in values.items() if k in keys})


def _emit(outcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.to_json(), indent=2))
    else:
        click.echo(outcome.format())


@click.command()
@click.argument("checkpoint", type=_PATH, required=False)
@click.option("-o", "--output", type=_PATH, default=None, help="Artifact directory.")
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp16",
    show_default=True,
    help="Precision of the exported graph (and engine).",
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option(
    "--external-data",
    is_flag=True,
    help="Always write the weights to model.onnx.data (default: only when they "
    "reach 1.5 GiB, as every real model does).",
)
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
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Load pytorch_model*.bin pickles (runs code from the file; trusted input only).",
)
@click.option("--force", is_flag=True, help="Replace an artifact of another checkpoint at OUTPUT.")
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
@_quant_options
@_engine_options
def build(checkpoint: Path | None, **params) -> None:
    """Build CHECKPOINT into an artifact with one TensorRT engine per hardware profile.

    Stages: export, optimize, quantize, compile, validate; a stage whose inputs did not change
    since the artifact at OUTPUT was written is reused. Engines for GPUs TensorRT-RTX can
    target (T4, A100, A6000, RTX 4090, L4, L40S) are built here without a GPU; for the others
    (H100/H200, Jetson Orin) a preflight compile runs here and `dsc compile` finishes the
    engine on the device.
    """
    from dsc import api

    values = _merged(dict(params, checkpoint=checkpoint))
    if values.get("checkpoint") is None:
        raise click.UsageError("missing CHECKPOINT (or `checkpoint:` in --config)")
    if values.get("output") is None:
        raise click.UsageError("missing -o/--output (or `output:` in --config)")
    outcome = api.build(
        values["checkpoint"], values["output"], _config(values), quiet=values["quiet"]
    )
    _emit(outcome, values["as_json"])


@click.command(name="compile")
@click.argument("artifact", type=_PATH)
@_engine_options
def compile_(artifact: Path, **params) -> None:
    """Build the engine for PROFILE(s) into ARTIFACT (from dsc export or dsc build).

    On a Jetson or H100 with standard TensorRT this builds the engine `dsc build` could only
    preflight; elsewhere it does what `dsc build` does for those profiles.
    """
    from dsc import api
    from dsc.config_file import COMPILE_KEYS

    values = _merged(params, allowed=COMPILE_KEYS)
    outcome = api.compile_artifact(artifact, _config(values), quiet=values["quiet"])
    _emit(outcome, values["as_json"])


@click.command()
@click.argument("artifact", type=_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Summarise ARTIFACT: model, graph, stages, engines per profile, validation, files."""
    from dsc import api
    from dsc.manifest import format_inspect

    summary = api.inspect_artifact(artifact)
    click.echo(json.dumps(summary, indent=2) if as_json else format_inspect(summary))


@click.command()
@click.argument("artifact", type=_PATH)
@click.option(
    "--inputs",
    "check_inputs",
    is_flag=True,
    help="Also re-hash the source checkpoint files recorded in the manifest.",
)
@click.option(
    "--checkpoint", type=_PATH, default=None, help="Where the checkpoint is now (implies --inputs)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(artifact: Path, check_inputs: bool, checkpoint: Path | None, as_json: bool) -> None:
    """Re-check every hash in ARTIFACT's manifest; exit 1 naming any file that differs."""
    from dsc import api
    from dsc.manifest import raise_for_problems

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
    raise_for_problems(result)


def register(cli: click.Group) -> None:
    cli.add_command(build)
    cli.add_command(compile_)
    cli.add_command(inspect)
    cli.add_command(verify)
