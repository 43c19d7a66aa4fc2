"""`dsc export` and `dsc run`: map flags onto `dsc.api.export` / `dsc.api.run`."""

from __future__ import annotations

from pathlib import Path

import click

from dsc.cli.options import PATH, allow_pickle_option, export_options, force_option


@click.command()
@click.argument("checkpoint", type=PATH)
@click.option("-o", "--output", "output", type=PATH, required=True, help="Artifact directory.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "fp16", "bf16"]),
    default="fp16",
    show_default=True,
    help="Precision of the exported graph.",
)
@export_options
@allow_pickle_option
@force_option()
def export(
    checkpoint: Path,
    output: Path,
    dtype: str,
    opset: int | None,
    external_data: bool,
    stream: bool,
    trace_layers: str,
    allow_pickle: bool,
    force: bool,
) -> None:
    """Export a Hugging Face checkpoint to one ONNX graph with KV-cache inputs/outputs."""
    from dsc import api

    result = api.export(
        checkpoint,
        output,
        dtype=dtype,
        opset=opset,
        external_data=external_data,
        stream=stream,
        trace_layers=trace_layers,
        allow_pickle=allow_pickle,
        force=force,
    )
    click.echo(f"exported {result.family} ({result.architecture}) to {result.path}")
    click.echo(
        f"  graph: {result.onnx_path.name}  dtype: {result.dtype}  "
        f"layers: {result.num_layers}  cache: {result.cache_kind}"
    )


@click.command()
@click.argument("artifact", type=PATH)
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--greedy/--sample", default=True, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def run(
    artifact: Path, prompt: str, max_new_tokens: int, greedy: bool, temperature: float, seed: int
) -> None:
    """Generate text from an exported artifact with ONNX Runtime."""
    from dsc import api

    text = api.run(
        artifact,
        prompt,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        seed=seed,
    )
    click.echo(text)


COMMANDS = (export, run)
