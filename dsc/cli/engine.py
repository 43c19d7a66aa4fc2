"""`dsc device-check` and `dsc triton`: engines on the target, mapped onto `dsc.api`.

(`--engine` on `dsc validate` / `dsc bench` is `dsc.cli.options.engine_run_options`; `--triton`
on `dsc build` is in `dsc.cli.build`.)
"""

from __future__ import annotations

from pathlib import Path

import click

from dsc.cli.options import PATH, RUNTIMES, force_option, ints, quiet_option
from dsc.cli.validate import print_engine_bench


@click.command(name="device-check")
@click.argument("artifact", type=PATH)
@click.option("--profile", "profile", required=True, help="The hardware profile of this device.")
@click.option(
    "--runtime",
    "runtime",
    type=RUNTIMES,
    default=None,
    help="The runtime (default: the engine's own; 'standin' for a dry run on a "
    "machine without a GPU: ONNX Runtime, not TensorRT).",
)
@click.option("--batch", default="1", show_default=True, help="Bench batch sizes, e.g. 1,4.")
@click.option(
    "--prompt-len", "prompt_len", default="128", show_default=True, help="Bench prompt lengths."
)
@click.option("--gen-len", type=click.IntRange(2), default=32, show_default=True)
@click.option(
    "--window",
    type=click.IntRange(8),
    default=128,
    show_default=True,
    help="Gate window length (at most the engine's max input length).",
)
@quiet_option("No progress lines.")
def device_check(
    artifact: Path,
    profile: str,
    runtime: str | None,
    batch: str,
    prompt_len: str,
    gen_len: int,
    window: int,
    quiet: bool,
) -> None:
    """On the target: compile PROFILE's engine if ARTIFACT holds only a preflight, validate it
    against the fp16 reference and benchmark it; manifest and report updated. Exit 1 when the
    gate fails."""
    from dsc import api

    r = api.device_check(
        artifact,
        profile,
        runtime=runtime,
        window=window,
        batches=ints(batch, "--batch"),
        prompt_lens=ints(prompt_len, "--prompt-len"),
        gen_len=gen_len,
        quiet=quiet,
    )
    click.echo(
        f"device-check {profile}: engine {'built here' if r['compiled'] else 'present'};"
        f" gate PASS; report: {artifact / 'report.html'}"
    )
    print_engine_bench(r["bench"])


@click.command(name="triton")
@click.argument("artifact", type=PATH)
@click.option(
    "-o",
    "--output",
    "output",
    type=PATH,
    required=True,
    help="Model repository directory to write.",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    help="Profile(s) whose engine to serve (default: every built engine).",
)
@force_option("Replace an existing repository at OUTPUT.")
def triton(artifact: Path, output: Path, profiles: tuple[str, ...], force: bool) -> None:
    """Write a Triton model repository serving ARTIFACT's engine(s), and print the command
    that starts tritonserver on it."""
    from dsc import api

    r = api.triton(artifact, output, profiles=profiles or None, force=force)
    click.echo(f"wrote {r.path} (models: {', '.join(r.models)})")
    click.echo(f"start: {r.command}")


COMMANDS = (device_check, triton)
