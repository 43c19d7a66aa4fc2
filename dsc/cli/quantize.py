"""`dsc quantize`: calibrate an artifact and write a quantized artifact (`dsc.api.quantize`).

Its flags (`dsc.cli.options.quant_options`) are shared with `dsc build`.
"""

from __future__ import annotations

from pathlib import Path

import click

from dsc.cli.options import PATH, force_option, quant_options


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
    calibrate_by="auto",
) -> dict | None:
    """Keyword arguments for `dsc.api.quantize`, or None when no precision flag was given."""
    from dsc import api

    precision = api.quantize_precision(int8, fp8, int4_awq)
    api.check_quantize_options(precision, quantize_lm_head, quantize_embedding)
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
        "calibrate_by": calibrate_by,
    }


@click.command()
@click.argument("artifact", type=PATH)
@click.option("-o", "--output", "output", type=PATH, required=True, help="New artifact directory.")
@quant_options
@click.option("--profile", default=None, help="Hardware profile: refuse precisions it cannot run.")
@click.option(
    "--move-input",
    is_flag=True,
    help="Move ARTIFACT's weights file into OUTPUT's reference/ instead of copying it (no "
    "second copy on disk: 31 GB for DeepSeek-V2-Lite), then remove ARTIFACT. OUTPUT must be on "
    "the same filesystem. On any failure ARTIFACT is left whole.",
)
@force_option()
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
    calibrate_by,
    profile,
    move_input,
    force,
) -> None:
    """Calibrate ARTIFACT and write a quantized artifact (Q/DQ graph + fp16 reference)."""
    from dsc import api

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
        calibrate_by,
    )
    if kw is None:
        raise click.UsageError("choose a precision: --int8, --fp8 or --int4-awq")
    if weight_only and kw["precision"] != "int8":
        raise click.UsageError(
            "--weight-only applies to --int8 only (INT4-AWQ is always "
            "weight-only; FP8 quantizes weights and activations)"
        )
    r = api.quantize(artifact, output, profile=profile, force=force, move_input=move_input, **kw)
    click.echo(f"quantized {artifact} to {r.path}: {r.scheme}, ranges by {r.method}")
    if move_input:
        click.echo(f"  moved its weights to {r.path / 'reference'}; removed {artifact}")
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


COMMANDS = (quantize,)
