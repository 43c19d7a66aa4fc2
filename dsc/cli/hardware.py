"""`dsc profiles list|show` and `dsc plan`: map flags onto `dsc.api` and print.

Errors are `DscError`s raised below `dsc.api`; `dsc.cli.main` turns them into one line and an
exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from dsc.cli.options import json_option, set_option
from dsc.errors import DoesNotFit, UsageError
from dsc.precision import TARGET_PRECISIONS


@click.group("profiles")
def profiles() -> None:
    """Hardware profiles: what each target GPU holds and how fast it can go."""


@profiles.command("list")
@json_option("Machine-readable output.")
def profiles_list(as_json: bool) -> None:
    """List the built-in profiles."""
    from dsc import api

    profs = api.list_profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profs], indent=2))
        return
    head = [
        "name",
        "kind",
        "SM",
        "memory GiB",
        "GB/s",
        "fp16 TF",
        "int8 TOPS",
        "precisions",
        "DLA",
        "aliases",
    ]
    rows = []
    for p in profs:
        t = p.throughput_tflops
        rows.append(
            [
                p.name,
                p.kind,
                str(p.sm),
                f"{p.memory.gb:g}" + (" shared" if p.memory.shared_with_cpu else ""),
                f"{p.memory.bandwidth_gbps:g}",
                f"{t.fp16:g}" if t.fp16 else "-",
                f"{t.int8:g}" if t.int8 else "-",
                ",".join(p.precisions),
                str(p.dla_cores),
                ",".join(p.aliases) or "-",
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@profiles.command("show")
@click.argument("name")
@set_option()
@json_option("Machine-readable output.")
def profiles_show(name: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Show one profile (NAME, alias, or path to a YAML file) after overrides."""
    from dsc import api

    prof = api.show_profile(name, overrides)
    data = prof.to_dict()
    if as_json:
        click.echo(
            json.dumps(
                {**data, "sm": prof.sm, "path": prof.path, "overrides": list(prof.overrides)},
                indent=2,
            )
        )
        return
    click.echo(
        f"# {prof.path}" + (f" with --set {' '.join(prof.overrides)}" if prof.overrides else "")
    )
    click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100).rstrip())


@click.command("plan")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--profile",
    "profile_name",
    required=True,
    help="Profile name, alias or YAML path; 'all' plans every built-in profile.",
)
@click.option(
    "--precision", type=click.Choice(TARGET_PRECISIONS), default="fp16", show_default=True
)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--context",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens of KV cache per sequence [default: the profile's envelope max_kv, "
    "capped at the model's max_position_embeddings].",
)
@click.option(
    "--input-len",
    type=click.IntRange(min=1),
    default=None,
    help="Prefill length [default: min(context, envelope max_input_len)].",
)
@click.option(
    "--quantize-lm-head",
    "lm_head",
    type=click.Choice(["int8", "fp8", "int4"]),
    default=None,
    help="Count lm_head quantized at this precision [default: fp16].",
)
@click.option(
    "--quantize-embedding",
    "embedding",
    type=click.Choice(["int8", "fp8", "int4"]),
    default=None,
    help="Count the embedding table quantized [default: fp16].",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tensor/expert parallel over N GPUs of the profile; memory is per GPU.",
)
@set_option()
@json_option("Machine-readable output.")
@click.option(
    "--strict",
    is_flag=True,
    help="Exit 6 when the model does not fit (with --profile all: fits none).",
)
def plan_cmd(
    model: Path,
    profile_name: str,
    precision: str,
    batch: int,
    context: int | None,
    input_len: int | None,
    lm_head: str | None,
    embedding: str | None,
    gpus: int,
    overrides: tuple[str, ...],
    as_json: bool,
    strict: bool,
) -> None:
    """Memory, verdict and speed ceilings for MODEL (a checkpoint dir or config.json) on a target.

    Works from config.json alone, so examples/configs/* plan without weights.
    """
    from dsc import api
    from dsc.plan import format_plan, format_table

    if profile_name.strip().lower() == "all":
        if lm_head or embedding or gpus > 1:
            raise UsageError(
                "--quantize-lm-head/--quantize-embedding/--gpus plan one profile; "
                "--profile all takes neither"
            )
        rows = api.plan_all(model, precision, batch, context, input_len, overrides)
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
        else:
            click.echo(format_table(rows))
        if strict and not any(r.fits for r in rows):
            raise DoesNotFit(f"{model} at {precision}, batch {batch} fits none of the profiles")
        return

    outcome = api.plan(
        model,
        profile_name,
        precision,
        batch,
        context,
        input_len,
        lm_head=lm_head,
        embedding=embedding,
        gpus=gpus,
        overrides=overrides,
    )
    result, rems, prof = outcome.result, outcome.remedies, outcome.profile
    if as_json:
        click.echo(json.dumps(outcome.to_json(), indent=2))
    else:
        click.echo(format_plan(result, rems))
    if strict and not result.fits:
        best = f"; {rems[0].change} ({rems[0].flags})" if rems and rems[0].fits else ""
        raise DoesNotFit(
            f"{result.model} needs {result.total / 2**30:.2f} GiB on {prof.name} "
            f"({result.capacity / 2**30:.2f} GiB){best}"
        )


COMMANDS = (profiles, plan_cmd)
