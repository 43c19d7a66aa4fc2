"""`dsc validate`, `dsc bench`, `dsc report`: map flags onto `dsc.api.validate` / `bench` /
`report`. With `--engine PROFILE` validate and bench run the built engine instead of the ONNX
graph (`dsc.cli.options.engine_run_options`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dsc.cli.options import (
    PATH,
    check_engine_options,
    engine_run_options,
    gate_options,
    ints,
    json_option,
)
from dsc.errors import CheckFailed


@click.command()
@click.argument("artifact", type=PATH)
@gate_options
@json_option("Print the full record as JSON.")
@engine_run_options
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
    engine: str | None,
    engine_runtime: str | None,
    cuda_graphs: bool,
) -> None:
    """Gate ARTIFACT against its FP16 reference; exit 0 on pass, 1 on fail."""
    from dsc import api

    check_engine_options(engine, engine_runtime)
    r = api.validate(
        artifact,
        reference=reference,
        data=data,
        thresholds=thresholds,
        precision=precision,
        windows=windows,
        window=window,
        prompts=prompts,
        gen_len=gen_len,
        engine=engine,
        runtime=engine_runtime,
        cuda_graphs=cuda_graphs,
        quiet=as_json,
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
    elif engine is not None:
        _print_engine_gate(engine, r, artifact)
    else:
        _print_gate(r, artifact)
    if not r["passed"]:
        if engine is not None:
            raise CheckFailed(
                f"engine {engine} failed the accuracy gate: {'; '.join(r['failures'])}"
            )
        fd = r.get("first_divergence")
        where = f"; first divergence at {fd['module']}" if fd else ""
        raise CheckFailed(f"validation failed: {'; '.join(r['failures'])}{where}")


def _print_gate(r: dict, artifact: Path) -> None:
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


def _print_engine_gate(engine: str, r: dict, artifact: Path) -> None:
    p = r["perplexity"]
    click.echo(
        f"engine {engine} ({r['runtime']}) against {r['reference']}: "
        f"{'PASS' if r['passed'] else 'FAIL'}"
    )
    click.echo(
        f"  prefill: top-1 {r['prefill']['top1']:.3f}  top-5 "
        f"{r['prefill']['top5']:.3f}  KL {r['prefill']['kl_mean']:.2e}  "
        f"cosine min {r['prefill']['cosine_min']:.5f}"
    )
    click.echo(f"  decode:  top-1 {r['decode']['top1']:.3f}  KL {r['decode']['kl_mean']:.2e}")
    click.echo(
        f"  perplexity {p['candidate']:.3f} vs {p['reference']:.3f} "
        f"({p['delta']:+.2%}); greedy tokens before divergence "
        f"{r['greedy']['mean_tokens_until_divergence']:.1f}/{r['greedy']['gen_len']}"
    )
    for f in r["failures"]:
        click.echo(f"  failed: {f}")
    click.echo(f"  report: {artifact / 'report.html'}")


@click.command()
@click.argument("artifact", type=PATH)
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
@json_option()
@engine_run_options
def bench(
    artifact: Path,
    batch: str,
    prompt_len: str,
    gen_len: int,
    warmup: int,
    repeats: int,
    profile: str | None,
    as_json: bool,
    engine: str | None,
    engine_runtime: str | None,
    cuda_graphs: bool,
) -> None:
    """Latency of ARTIFACT: TTFT, TPOT (p50/p90/p99), tokens/s over a grid."""
    from dsc import api

    check_engine_options(engine, engine_runtime)
    r = api.bench(
        artifact,
        batches=ints(batch, "--batch"),
        prompt_lens=ints(prompt_len, "--prompt-len"),
        gen_len=gen_len,
        warmup=warmup,
        repeats=repeats,
        profile=profile if engine is None else None,
        engine=engine,
        runtime=engine_runtime,
        cuda_graphs=cuda_graphs,
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
    elif engine is not None:
        print_engine_bench(r)
    else:
        _print_bench(r)


def _print_bench(r: dict) -> None:
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


def print_engine_bench(r: dict) -> None:
    """The bench table of an engine (one block of rows per CUDA-graph setting)."""
    click.echo(f"engine {r['profile']} ({r['runtime']})")
    if r.get("note"):
        click.echo(f"  note: {r['note']}")
    click.echo(
        f"{'graphs':>6} {'batch':>5} {'prompt':>6} {'TTFT p50':>9} {'TPOT p50':>9} "
        f"{'p90':>7} {'p99':>7} {'tok/s':>8} {'roofline':>8}"
    )
    for run in r["runs"]:
        for row in run["rows"]:
            frac = row.get("fraction_of_roofline")
            click.echo(
                f"{'on' if run['cuda_graphs'] else 'off':>6} {row['batch']:>5} "
                f"{row['prompt_len']:>6} {row['ttft']['p50_ms']:>7.2f}ms "
                f"{row['tpot']['p50_ms']:>7.2f}ms {row['tpot']['p90_ms']:>7.2f} "
                f"{row['tpot']['p99_ms']:>7.2f} {row['decode_tokens_per_s']:>8.1f} "
                f"{'—' if frac is None else f'{frac:.1%}':>8}"
            )


@click.command()
@click.argument("artifact", type=PATH)
def report(artifact: Path) -> None:
    """Regenerate report.json, report.md and report.html of ARTIFACT."""
    from dsc import api

    api.report(artifact)
    click.echo(f"wrote {artifact / 'report.json'}, report.md, report.html")


COMMANDS = (validate, bench, report)
