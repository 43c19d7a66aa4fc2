"""`dsc passes list` and `dsc optimize`: map flags onto `dsc.api.list_passes` / `optimize`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dsc.cli.options import PATH, force_option, json_option, names


@click.group()
def passes() -> None:
    """Graph passes (cleanup, fusions, lowering) run by `dsc optimize`."""


@passes.command("list")
@json_option("Print the registry as JSON.")
def list_cmd(as_json: bool) -> None:
    """Registered passes, in default pipeline order."""
    from dsc import api

    registry = api.list_passes()
    if as_json:
        click.echo(json.dumps(registry.to_json(), indent=2))
        return
    width = max(len(p.name) for p in registry.passes)
    for p in registry.passes:
        click.echo(f"{p.name:<{width}}  {p.kind:<8}  {p.doc}")
    click.echo(f"\ndefault pipeline: {' → '.join(registry.pipeline)}")


@click.command()
@click.argument("artifact", type=PATH)
@click.option("-o", "--output", type=PATH, required=True, help="New artifact directory.")
@click.option(
    "--passes",
    "only",
    multiple=True,
    help="Run only these passes, in this order (comma-separated or repeated).",
)
@click.option(
    "--disable-pass",
    "disable",
    multiple=True,
    help="Leave this pass out of the pipeline (repeatable).",
)
@click.option(
    "--profile",
    default=None,
    help="Hardware profile (name or YAML path): picks the fused ops the target's "
    "TensorRT parses. Without it only ops every supported TensorRT parses.",
)
@click.option(
    "--target-ops",
    type=click.Choice(["auto", "portable", "opset23"]),
    default="auto",
    show_default=True,
    help="Override which fused ops are emitted.",
)
@click.option(
    "--mla-absorb-max-seq",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="MLA: query lengths up to this use the weight-absorbed attention (0: never).",
)
@click.option(
    "--moe-gather/--no-moe-gather",
    default=True,
    show_default=True,
    help="MoE: keep the per-token expert gather for small batches (else always dense).",
)
@click.option(
    "--dump-after",
    "dump_after",
    multiple=True,
    help="Save the graph after this pass into OUTPUT/dumps/ (repeatable).",
)
@click.option(
    "--verify-each",
    is_flag=True,
    help="Run ONNX Runtime after every pass and fail naming the pass that changed the outputs.",
)
@force_option()
@json_option("Print the pass report as JSON.")
def optimize(
    artifact: Path,
    output: Path,
    only: tuple[str, ...],
    disable: tuple[str, ...],
    profile: str | None,
    target_ops: str,
    mla_absorb_max_seq: int,
    moe_gather: bool,
    dump_after: tuple[str, ...],
    verify_each: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Run the graph passes on ARTIFACT's ONNX graph and write a new artifact to OUTPUT."""
    from dsc import api
    from dsc.passes.coverage import format_coverage

    result = api.optimize(
        artifact,
        output,
        profile=profile,
        target_ops=target_ops,
        mla_absorb_max_seq=mla_absorb_max_seq,
        moe_gather=moe_gather,
        only=names(only) or None,
        disable=names(disable),
        dump_after=names(dump_after),
        verify_each=verify_each,
        force=force,
    )
    r = result.report
    if as_json:
        click.echo(
            json.dumps(
                {"path": str(result.path), "report": r.to_json(), "coverage": result.coverage},
                indent=2,
            )
        )
        return
    click.echo(
        f"optimized {artifact} → {result.path}  ({r.nodes_before} → {r.nodes_after} "
        f"nodes, {result.seconds:.1f}s; target: {r.target})"
    )
    for p in r.passes:
        counts = ", ".join(f"{k} {v}" for k, v in p.counts.items())
        verify = f"  verify {p.verify_max_abs:.1e}" if p.verify_max_abs is not None else ""
        click.echo(
            f"  {p.name:<16} {p.seconds * 1000:7.1f} ms  {p.nodes_before:5d} → "
            f"{p.nodes_after:5d}{'  ' + counts if counts else ''}{verify}"
        )
    click.echo(format_coverage(result.coverage, "coverage:"))


COMMANDS = (passes, optimize)
