"""`dsc matrix`: maps flags onto `dsc.api.matrix` / `matrix_plan` (docs/MATRIX.md)."""

from __future__ import annotations

from pathlib import Path

import click

from dsc.cli.options import json_option


@click.command()
@click.argument("matrix_file", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Root of the artifacts, OUT/<model>/<precision>/ (storage every worker reaches).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: worker processes on this host; ray: tasks on an existing Ray cluster.",
)
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS).")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Local worker processes (default: the host's cores, as memory allows).",
)
@click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="Print the cells and their `dsc build` command lines; run nothing.",
)
@json_option("Print the summary (or plan) as JSON.")
def matrix(
    matrix_file: Path,
    output: Path,
    executor: str,
    address: str | None,
    workers: int | None,
    plan_only: bool,
    as_json: bool,
) -> None:
    """Build every (model, precision) of MATRIX_FILE for every legal profile, sharing stages."""
    from dsc import api
    from dsc.matrix.run import format_summary, to_json

    if plan_only:
        doc = api.matrix_plan(matrix_file, output)
        if as_json:
            click.echo(to_json(doc))
        else:
            for c in doc["cells"]:
                click.echo(
                    c["command"]
                    or f"# {c['model']}/{c['precision']}: skipped: "
                    + "; ".join(c["skipped_profiles"].values())
                )
        return
    doc = api.matrix(
        matrix_file, output, executor=executor, address=address, workers=workers, quiet=as_json
    )
    click.echo(to_json(doc) if as_json else format_summary(doc))
    api.check_matrix(doc)


COMMANDS = (matrix,)
