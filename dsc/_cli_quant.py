"""CLI command `dsc quantize`: calibrate an artifact and write a quantized artifact.

`quant_options` is the same set of flags as a decorator, so `dsc build` can take them too
(`--int8|--fp8|--int4-awq [--calib ...] [--method ...] [--exclude ...] [--quantize-lm-head P]
[--quantize-embedding P]`) and pass them to
`dsc.stages.quantize.quantize_artifact` via `quant_kwargs`.
"""

from __future__ import annotations

from pathlib import Path

import click

_PATH = click.Path(path_type=Path)


def quant_options(f):
    """The quantization flags, shared by `dsc quantize` and `dsc build`."""
    opts = [
        click.option(
            "--int8", is_flag=True, help="INT8 (W8A8 with SmoothQuant; see --weight-only)."
        ),
        click.option("--fp8", is_flag=True, help="FP8 E4M3 weights and activations (SM89+)."),
        click.option(
            "--int4-awq",
            "int4_awq",
            is_flag=True,
            help="INT4 AWQ weight-only, group size 128 (SM80+).",
        ),
        click.option("--weight-only", is_flag=True, help="Quantize weights only (INT8)."),
        click.option(
            "--calib",
            type=_PATH,
            default=None,
            help="Calibration text, JSONL or directory (default: shipped text).",
        ),
        click.option(
            "--method",
            type=click.Choice(["max", "percentile", "entropy", "mse"]),
            default=None,
            help="Activation range method (default: max).",
        ),
        click.option(
            "--alpha",
            type=_ALPHA,
            default="auto",
            show_default=True,
            help="SmoothQuant migration strength (INT8 W8A8): auto searches it per "
            "layer; a number in [0, 1] fixes it (0 disables smoothing).",
        ),
        click.option(
            "--samples",
            type=click.IntRange(1),
            default=64,
            show_default=True,
            help="Calibration windows.",
        ),
        click.option(
            "--seq-len",
            type=click.IntRange(2),
            default=128,
            show_default=True,
            help="Tokens per calibration window.",
        ),
        click.option(
            "--exclude",
            "exclude",
            multiple=True,
            metavar="PATTERN",
            help="Keep matching modules in float (glob on the HF module path; "
            "embeddings, lm_head and MoE routers are kept unless the two "
            "options below quantize them).",
        ),
        click.option(
            "--quantize-lm-head",
            "quantize_lm_head",
            type=_VOCAB,
            default=None,
            help="Also store lm_head quantized, weight-only: int8/fp8 per output "
            "channel, int4 per block of 128 (int4 SM80+, fp8 SM89+).",
        ),
        click.option(
            "--quantize-embedding",
            "quantize_embedding",
            type=_VOCAB,
            default=None,
            help="Also store the embedding table quantized (per row; int4 per block "
            "of 128), dequantized before the gather.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


class _Alpha(click.ParamType):
    name = "auto|0..1"

    def convert(self, value, param, ctx):
        if value is None or value == "auto":
            return None
        try:
            a = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither auto nor a number", param, ctx)
        if not 0.0 <= a <= 1.0:
            self.fail(f"{value} is not in [0, 1]", param, ctx)
        return a


_ALPHA = _Alpha()


_VOCAB = click.Choice(["int8", "int4", "fp8"])


def quant_kwargs(
    int8: bool,
    fp8: bool,
    int4_awq: bool,
    weight_only: bool,
    calib,
    method,
    alpha,
    samples,
    seq_len,
    exclude,
    quantize_lm_head=None,
    quantize_embedding=None,
) -> dict | None:
    """Keyword arguments for `quantize_artifact`, or None when no precision flag was given."""
    from dsc.precision import precision_from_flags
    from dsc.quantize import check_vocab_options

    precision = precision_from_flags(int8, fp8, int4_awq)
    check_vocab_options(quantize_lm_head, quantize_embedding, precision)
    if precision is None:
        return None
    return {
        "precision": precision,
        "weight_only": weight_only,
        "calib": calib,
        "method": method,
        "alpha": alpha,
        "samples": samples,
        "seq_len": seq_len,
        "exclude": tuple(exclude),
        "lm_head": quantize_lm_head,
        "embedding": quantize_embedding,
    }


@click.command()
@click.argument("artifact", type=_PATH)
@click.option("-o", "--output", "output", type=_PATH, required=True, help="New artifact directory.")
@quant_options
@click.option("--profile", default=None, help="Hardware profile: refuse precisions it cannot run.")
@click.option("--force", is_flag=True, help="Replace an existing dsc artifact at OUTPUT.")
def quantize(
    artifact: Path,
    output: Path,
    int8,
    fp8,
    int4_awq,
    weight_only,
    calib,
    method,
    alpha,
    samples,
    seq_len,
    exclude,
    quantize_lm_head,
    quantize_embedding,
    profile,
    force,
) -> None:
    """Calibrate ARTIFACT and write a quantized artifact (Q/DQ graph + fp16 reference)."""
    from dsc.stages.quantize import quantize_artifact

    kw = quant_kwargs(
        int8,
        fp8,
        int4_awq,
        weight_only,
        calib,
        method,
        alpha,
        samples,
        seq_len,
        exclude,
        quantize_lm_head,
        quantize_embedding,
    )
    if kw is None:
        raise click.UsageError("choose a precision: --int8, --fp8 or --int4-awq")
    if weight_only and kw["precision"] != "int8":
        raise click.UsageError(
            "--weight-only applies to --int8 only (INT4-AWQ is always "
            "weight-only; FP8 quantizes weights and activations)"
        )
    r = quantize_artifact(artifact, output, profile=profile, force=force, **kw)
    click.echo(f"quantized {artifact} to {r.path}: {r.scheme}, ranges by {r.method}")
    click.echo(f"  layers: {r.quantized_layers} quantized, {len(r.excluded)} excluded")
    for name in ("lm_head", "embedding"):
        v = r.report["vocab"].get(name)
        if v:
            click.echo(
                f"  {name}: {v['precision']} weight-only, {v['scales']} "
                f"({v['bytes_before'] / 2**20:,.2f} -> {v['bytes_after'] / 2**20:,.2f} MiB"
                f"{', tied' if v['tied'] else ''})"
            )
    if r.under_calibrated:
        click.echo(
            f"  warning: {len(r.under_calibrated)} MoE experts saw fewer than "
            f"{r.report['experts']['min_tokens']} calibration tokens: "
            + ", ".join(u["expert"] for u in r.under_calibrated[:8])
        )


def register(cli: click.Group) -> None:
    cli.add_command(quantize)
