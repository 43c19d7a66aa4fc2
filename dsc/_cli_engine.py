"""CLI glue for engines at run time: `--engine` on `dsc validate` / `dsc bench`, `--triton` on
`dsc build`, and the commands `dsc device-check` and `dsc triton`. The logic is in
`dsc.runtime`; this module maps options onto it.

`--engine` is added to the existing commands by wrapping their callbacks (without `--engine`
they run exactly as before), so their own modules stay as they are.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

_PATH = click.Path(path_type=Path)
_RUNTIMES = click.Choice(["tensorrt", "tensorrt_rtx", "standin"])


def _engine_params() -> list[click.Parameter]:
    return [
        click.Option(
            ["--engine", "engine"],
            default=None,
            metavar="PROFILE",
            help="Run the engine built for PROFILE (on this GPU) instead of the ONNX "
            "graph in ONNX Runtime.",
        ),
        click.Option(
            ["--runtime", "engine_runtime"],
            type=_RUNTIMES,
            default=None,
            help="With --engine: the runtime (default: the engine's own; 'standin' is "
            "ONNX Runtime behind the TensorRT API, for machines without a GPU, "
            "never a measurement of TensorRT).",
        ),
        click.Option(
            ["--cuda-graphs/--no-cuda-graphs", "cuda_graphs"],
            default=True,
            show_default=True,
            help="With --engine: run recurring decode shapes under CUDA graphs.",
        ),
    ]


def _wrap(cmd: click.Command, handler) -> None:
    original = cmd.callback
    cmd.params.extend(_engine_params())

    @functools.wraps(original)
    def callback(*, engine, engine_runtime, cuda_graphs, **kw):
        if engine is None:
            if engine_runtime is not None:
                raise click.UsageError("--runtime needs --engine PROFILE")
            return original(**kw)
        return handler(engine, engine_runtime, cuda_graphs, **kw)

    cmd.callback = callback


def _validate(
    engine,
    runtime,
    cuda_graphs,
    *,
    artifact,
    reference,
    data,
    thresholds,
    precision,
    windows,
    window,
    prompts,
    gen_len,
    as_json,
):
    from dsc.errors import CheckFailed
    from dsc.runtime.evaluate import validate_engine
    from dsc.validate.gate import GateOptions, parse_thresholds

    opts = GateOptions(window=window, windows=windows, prompts=prompts, gen_len=gen_len)
    r = validate_engine(
        artifact,
        engine,
        reference=reference,
        data=data,
        thresholds=parse_thresholds(thresholds),
        precision=precision,
        options=opts,
        runtime=runtime,
        cuda_graphs=cuda_graphs,
        quiet=as_json,
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
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
    if not r["passed"]:
        raise CheckFailed(f"engine {engine} failed the accuracy gate: {'; '.join(r['failures'])}")


def _bench(
    engine,
    runtime,
    cuda_graphs,
    *,
    artifact,
    batch,
    prompt_len,
    gen_len,
    warmup,
    repeats,
    profile,
    as_json,
):
    from dsc._cli_validate import _ints
    from dsc.runtime.evaluate import bench_engine

    r = bench_engine(
        artifact,
        engine,
        batches=_ints(batch, "--batch"),
        prompt_lens=_ints(prompt_len, "--prompt-len"),
        gen_len=gen_len,
        warmup=max(warmup, 2) if cuda_graphs else warmup,
        repeats=repeats,
        runtime=runtime,
        graphs=(True, False) if cuda_graphs else (False,),
    )
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    _print_bench(r)


def _print_bench(r: dict) -> None:
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


@click.command(name="device-check")
@click.argument("artifact", type=_PATH)
@click.option("--profile", "profile", required=True, help="The hardware profile of this device.")
@click.option(
    "--runtime",
    "runtime",
    type=_RUNTIMES,
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
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
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
    from dsc._cli_validate import _ints
    from dsc.runtime.evaluate import device_check as run
    from dsc.validate.gate import GateOptions

    r = run(
        artifact,
        profile,
        runtime=runtime,
        quiet=quiet,
        validate_options={"options": GateOptions(window=window)},
        bench_options={
            "batches": _ints(batch, "--batch"),
            "prompt_lens": _ints(prompt_len, "--prompt-len"),
            "gen_len": gen_len,
        },
    )
    click.echo(
        f"device-check {profile}: engine {'built here' if r['compiled'] else 'present'};"
        f" gate PASS; report: {artifact / 'report.html'}"
    )
    _print_bench(r["bench"])


@click.command(name="triton")
@click.argument("artifact", type=_PATH)
@click.option(
    "-o",
    "--output",
    "output",
    type=_PATH,
    required=True,
    help="Model repository directory to write.",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    help="Profile(s) whose engine to serve (default: every built engine).",
)
@click.option("--force", is_flag=True, help="Replace an existing repository at OUTPUT.")
def triton(artifact: Path, output: Path, profiles: tuple[str, ...], force: bool) -> None:
    """Write a Triton model repository serving ARTIFACT's engine(s), and print the command
    that starts tritonserver on it."""
    from dsc.runtime.triton import write_repository

    r = write_repository(artifact, output, profiles=profiles or None, force=force)
    click.echo(f"wrote {r.path} (models: {', '.join(r.models)})")
    click.echo(f"start: {r.command}")


def _wrap_build(cmd: click.Command) -> None:
    original = cmd.callback
    cmd.params.append(
        click.Option(
            ["--triton", "triton"],
            is_flag=True,
            help="Also write a Triton model repository for the built engines to OUTPUT.triton/.",
        )
    )

    @functools.wraps(original)
    def callback(*, triton, **kw):
        if triton and kw.get("output") is None:
            raise click.UsageError("--triton needs -o OUTPUT on the command line")
        result = original(**kw)
        if triton:
            from dsc.runtime.triton import write_repository

            out = Path(str(kw["output"]).rstrip("/") + ".triton")
            r = write_repository(kw["output"], out, force=True)
            err = bool(kw.get("as_json"))  # keep stdout the build's JSON
            click.echo(f"triton repository: {r.path} (models: {', '.join(r.models)})", err=err)
            click.echo(f"start: {r.command}", err=err)
        return result

    cmd.callback = callback


def register(cli: click.Group) -> None:
    """Add the engine options to validate/bench/build and the engine commands (call after
    those commands are registered)."""
    _wrap(cli.commands["validate"], _validate)
    _wrap(cli.commands["bench"], _bench)
    if "build" in cli.commands:
        _wrap_build(cli.commands["build"])
    cli.add_command(device_check)
    cli.add_command(triton)
