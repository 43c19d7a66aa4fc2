"""CLI commands for the validation gate, latency and reports (`dsc validate|bench|report`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dsc.errors import CheckFailed

_PATH = click.Path(path_type=Path)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=f"'{option}'"
        ) from None
    if not values or min(values) < 1:
        raise click.BadParameter(
            f"expected positive integers, got {text!r}", param_hint=f"'{option}'"
        )
    return values


@click.command()
@click.argument("artifact", type=_PATH)
@click.option(
    "--reference",
    default="fp16",
    show_default=True,
    help="fp16 (the artifact's FP16 export), an artifact directory, or a .onnx file.",
)
@click.option(
    "--data",
    type=_PATH,
    default=None,
    help="Held-out text file (default: the held-out split of the shipped corpus).",
)
@click.option(
    "--thresholds",
    "thresholds",
    multiple=True,
    help="Override gate thresholds, e.g. max_ppl_delta=0.03,min_top1=0.9.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "bf16", "fp8", "int8", "int4"]),
    default=None,
    help="Candidate precision for default thresholds (default: from the artifact).",
)
@click.option("--windows", type=click.IntRange(1), default=8, show_default=True)
@click.option("--window", type=click.IntRange(8), default=128, show_default=True)
@click.option("--prompts", type=click.IntRange(1), default=8, show_default=True)
@click.option("--gen-len", type=click.IntRange(1), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
def validate(
    artifact: Path,
    reference: str,
    data: Path | None,
    thresholds: tuple[str, ...],
    precision: str | None,
    windows: int,
    window: int,
    prompts: int,
    gen_len: int,
    as_json: bool,
) -> None:
    """Gate ARTIFACT against its FP16 reference; exit 0 on pass, 1 on fail."""
    from dsc.validate.gate import GateOptions, parse_thresholds
    from dsc.validate.run import validate_artifact

    opts = GateOptions(window=window, windows=windows, prompts=prompts, gen_len=gen_len)
    r = validate_artifact(
        artifact,
        reference=reference,
        data=data,
        thresholds=parse_thresholds(thresholds),
        precision=precision,
        options=opts,
        quiet=as_json,
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        p = r["perplexity"]
        click.echo(
            f"validation ({r['precision']}) against {r['reference']}: "
            f"{'PASS' if r['passed'] else 'FAIL'}"
        )
        pre, dec = r["prefill"], r["decode"]
        click.echo(
            f"  prefill: cosine p01 {pre.get('cosine_p01', pre['cosine_min']):.5f} "
            f"(min {r['prefill']['cosine_min']:.5f})  top-1 "
            f"{r['prefill']['top1']:.3f}  top-5 {r['prefill']['top5']:.3f}  "
            f"KL {r['prefill']['kl_mean']:.2e}  max abs {r['prefill']['max_abs']:.3g}"
        )
        click.echo(
            f"  decode:  cosine p01 {dec.get('cosine_p01', dec['cosine_min']):.5f} "
            f"(min {r['decode']['cosine_min']:.5f})  top-1 "
            f"{r['decode']['top1']:.3f}  KL {r['decode']['kl_mean']:.2e}"
        )
        click.echo(
            f"  perplexity {p['candidate']:.3f} vs {p['reference']:.3f} ({p['delta']:+.2%});"
            f" greedy tokens before divergence "
            f"{r['greedy']['mean_tokens_until_divergence']:.1f}/{r['greedy']['gen_len']}"
        )
        for f in r["failures"]:
            click.echo(f"  failed: {f}")
        fd = r.get("first_divergence")
        if fd and not r["passed"]:
            click.echo(
                f"  first divergence: layer {fd['layer']} {fd['module']} "
                f"(tensor {fd['tensor']}, relative error {fd['rel_error']:.3g})"
            )
        click.echo(f"  report: {artifact / 'report.html'}")
    if not r["passed"]:
        fd = r.get("first_divergence")
        where = f"; first divergence at {fd['module']}" if fd else ""
        raise CheckFailed(f"validation failed: {'; '.join(r['failures'])}{where}")


@click.command()
@click.argument("artifact", type=_PATH)
@click.option("--batch", "batch", default="1", show_default=True, help="Batch sizes, e.g. 1,2,4.")
@click.option(
    "--prompt-len",
    "prompt_len",
    default="128",
    show_default=True,
    help="Prompt lengths, e.g. 32,128.",
)
@click.option("--gen-len", type=click.IntRange(2), default=32, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True)
@click.option("--profile", default=None, help="Also report this target's decode ceiling.")
@click.option("--json", "as_json", is_flag=True)
def bench(
    artifact: Path,
    batch: str,
    prompt_len: str,
    gen_len: int,
    warmup: int,
    repeats: int,
    profile: str | None,
    as_json: bool,
) -> None:
    """Latency of ARTIFACT: TTFT, TPOT (p50/p90/p99), tokens/s over a grid."""
    from dsc.validate.run import bench_artifact

    r = bench_artifact(
        artifact,
        batches=_ints(batch, "--batch"),
        prompt_lens=_ints(prompt_len, "--prompt-len"),
        gen_len=gen_len,
        warmup=warmup,
        repeats=repeats,
        profile=profile,
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"backend {r['backend']}; host memory bandwidth {r['host_bandwidth_gbps']:.1f} GB/s")
    click.echo(
        f"{'batch':>5} {'prompt':>6} {'TTFT p50':>9} {'TPOT p50':>9} {'p90':>7} {'p99':>7} "
        f"{'tok/s':>8} {'BW frac':>7}"
    )
    for row in r["rows"]:
        click.echo(
            f"{row['batch']:>5} {row['prompt_len']:>6} {row['ttft']['p50_ms']:>7.2f}ms "
            f"{row['tpot']['p50_ms']:>7.2f}ms {row['tpot']['p90_ms']:>7.2f} "
            f"{row['tpot']['p99_ms']:>7.2f} {row['decode_tokens_per_s']:>8.1f} "
            f"{row['fraction_of_host_bandwidth']:>7.1%}"
        )
    if r.get("target"):
        t = r["target"]
        for row in t["rows"]:
            click.echo(
                f"target {t['profile']}: batch {row['batch']} decode ceiling "
                f"{row['decode_ceiling_tokens_per_s']:.0f} tok/s"
            )


@click.command()
@click.argument("artifact", type=_PATH)
def report(artifact: Path) -> None:
    """Regenerate report.json, report.md and report.html of ARTIFACT."""
    from dsc.validate.report import write_reports

    write_reports(artifact)
    click.echo(f"wrote {artifact / 'report.json'}, report.md, report.html")


def register(cli: click.Group) -> None:
    cli.add_command(validate)
    cli.add_command(bench)
    cli.add_command(report)
