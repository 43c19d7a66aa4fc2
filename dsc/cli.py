"""Command line: a thin click layer. Each command parses options and calls one `dsc.api` function.

`main()` turns a `DscError` into one line on stderr and its documented exit code (see
`dsc.errors`), Ctrl-C into exit 130, and any other exception into exit 70 with a short message
(set DSC_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from dsc import __version__
from dsc.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, DscError

_PATH = click.Path(path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsc")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Compile DeepSeek-family LLMs into validated, per-GPU TensorRT engines."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("checkpoint", type=_PATH)
@click.option("-o", "--output", "output", type=_PATH, required=True, help="Artifact directory.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16",
              show_default=True, help="Precision of the exported graph.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--external-data", is_flag=True,
              help="Always write the weights to model.onnx.data (default: only when they "
                   "reach 1.5 GiB, as every real model does).")
@click.option("--allow-pickle", is_flag=True,
              help="Load pytorch_model*.bin pickles (runs code from the file; trusted input only).")
@click.option("--force", is_flag=True, help="Replace an existing dsc artifact at OUTPUT.")
def export(checkpoint: Path, output: Path, dtype: str, opset: int | None, external_data: bool,
           allow_pickle: bool, force: bool) -> None:
    """Export a Hugging Face checkpoint to one ONNX graph with KV-cache inputs/outputs."""
    from dsc import api

    result = api.export(checkpoint, output, dtype=dtype, opset=opset,
                        external_data=external_data, allow_pickle=allow_pickle, force=force)
    click.echo(f"exported {result.family} ({result.architecture}) to {result.path}")
    click.echo(f"  graph: {result.onnx_path.name}  dtype: {result.dtype}  "
               f"layers: {result.num_layers}  cache: {result.cache_kind}")


@cli.command()
@click.argument("artifact", type=_PATH)
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--greedy/--sample", default=True, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def run(artifact: Path, prompt: str, max_new_tokens: int, greedy: bool, temperature: float,
        seed: int) -> None:
    """Generate text from an exported artifact with ONNX Runtime."""
    from dsc import api

    text = api.run(artifact, prompt, max_new_tokens=max_new_tokens, greedy=greedy,
                   temperature=temperature, seed=seed)
    click.echo(text)


def _register_optional_groups() -> None:
    # Commands that live in their own modules register here, so this file stays a list.
    from dsc import _cli_hw

    _cli_hw.register(cli)
    from dsc import _cli_validate

    _cli_validate.register(cli)
    from dsc import _cli_build

    _cli_build.register(cli)
    from dsc import _cli_quant
    _cli_quant.register(cli)
    from dsc import _cli_passes
    _cli_passes.register(cli)


_register_optional_groups()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="dsc", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("dsc: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("dsc: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except DscError as e:
        click.echo(f"dsc: error: {e}", err=True)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: keep it to one line unless asked
        if os.environ.get("DSC_DEBUG"):
            raise
        click.echo(f"dsc: internal error: {type(e).__name__}: {e} (set DSC_DEBUG=1 for details)",
                   err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


if __name__ == "__main__":
    main()
