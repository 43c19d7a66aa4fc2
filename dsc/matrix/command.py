"""The `dsc matrix` click command: maps flags onto `dsc.matrix.run` (docs/MATRIX.md)."""

from __future__ import annotations

from pathlib import Path

import click


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
@click.option("--json", "as_json", is_flag=True, help="Print the summary (or plan) as JSON.")
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
    from dsc.matrix.run import check, format_summary, plan_json, run_matrix, to_json
    from dsc.matrix.spec import load_matrix

    m = load_matrix(matrix_file)
    if plan_only:
        doc = plan_json(m, output)
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
    if executor == "ray":
        from dsc.matrix.executors import RayExecutor

        ex = RayExecutor(address)
    else:
        from dsc.matrix.executors import LocalExecutor

        ex = LocalExecutor(workers)
    import contextlib
    import sys

    # Ray prints cluster events (a worker that died, ...) on stdout: stdout is the summary's.
    with contextlib.redirect_stdout(sys.stderr):
        doc = run_matrix(m, output, ex, quiet=as_json)
    click.echo(to_json(doc) if as_json else format_summary(doc))
    check(doc)


def register(cli: click.Group) -> None:
    cli.add_command(matrix)
