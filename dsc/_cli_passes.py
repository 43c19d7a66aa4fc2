"""CLI for graph passes: `dsc passes list` and `dsc optimize`."""

from __future__ import annotations

import json
from pathlib import Path

import click

_PATH = click.Path(path_type=Path)


def _names(values: tuple[str, ...]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


@click.group()
def passes() -> None:
    """Graph passes (cleanup, fusions, lowering) run by `dsc optimize`."""


@passes.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def list_cmd(as_json: bool) -> None:
    """Registered passes, in default pipeline order."""
    from dsc.passes import PIPELINE, list_passes

    infos = list_passes()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "pipeline": list(PIPELINE),
                    "passes": [{"name": p.name, "kind": p.kind, "doc": p.doc} for p in infos],
                },
                indent=2,
            )
        )
        return
    width = max(len(p.name) for p in infos)
    for p in infos:
        click.echo(f"{p.name:<{width}}  {p.kind:<8}  {p.doc}")
    click.echo(f"\ndefault pipeline: {' → '.join(PIPELINE)}")


@click.command()
@click.argument("artifact", type=_PATH)
@click.option("-o", "--output", type=_PATH, required=True, help="New artifact directory.")
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
@click.option("--force", is_flag=True, help="Replace an existing dsc artifact at OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the pass report as JSON.")
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
    from dsc.passes import PassOptions
    from dsc.passes.coverage import format_coverage
    from dsc.stages.optimize import optimize_artifact

    hw = None
    if profile:
        from dsc.hardware import load_profile

        hw = load_profile(profile)
    options = PassOptions(
        target_ops=target_ops, mla_absorb_max_seq=mla_absorb_max_seq, moe_gather_decode=moe_gather
    )
    result = optimize_artifact(
        artifact,
        output,
        profile=hw,
        options=options,
        only=_names(only) or None,
        disable=_names(disable),
        dump_after=_names(dump_after),
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


def register(cli: click.Group) -> None:
    cli.add_command(passes)
    cli.add_command(optimize)
