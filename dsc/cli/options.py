"""Option groups shared by several commands: each option is defined once, here.

A group is a decorator adding its options in order (the first listed comes first in `--help`).
Groups: `export_options` and `allow_pickle_option` (export, build), `envelope_options` (build,
compile: profiles, the engine envelope, backend, reuse, config file), `quant_options`
(quantize, build), `gate_options` (validate), `engine_run_options` (validate, bench: run a
built engine), `set_option` (profiles show, plan), and the single flags `json_option`,
`quiet_option`, `force_option`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

PATH = click.Path(path_type=Path)
RUNTIMES = click.Choice(["tensorrt", "tensorrt_rtx", "standin"])
VOCAB = click.Choice(["int8", "int4", "fp8"])
GATE_PRECISIONS = click.Choice(["fp32", "fp16", "bf16", "fp8", "int8", "int4"])
SET_HELP = "Override one profile field, e.g. --set builder.workspace_gb=8 (repeatable)."


def group(*opts: Callable) -> Callable:
    """One decorator applying `opts` so that they appear in `--help` in the order given."""

    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return apply


def json_option(help: str | None = None) -> Callable:
    """`--json` (parameter `as_json`): print one JSON document on stdout."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def quiet_option(help: str = "No progress lines on stderr.") -> Callable:
    return click.option("-q", "--quiet", is_flag=True, help=help)


def force_option(help: str = "Replace an existing dsc artifact at OUTPUT.") -> Callable:
    return click.option("--force", is_flag=True, help=help)


def set_option(help: str = SET_HELP) -> Callable:
    """`--set KEY=VALUE` (parameter `overrides`, repeatable): a profile field override."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help)


def ints(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated positive integers of `option` (`--batch 1,2,4`), or a usage error."""
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


def names(values: tuple[str, ...]) -> list[str]:
    """`--passes a,b --passes c` → ["a", "b", "c"]."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


# --- export (dsc export, dsc build) -------------------------------------------------------------

export_options = group(
    click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)."),
    click.option(
        "--external-data",
        is_flag=True,
        help="Always write the weights to model.onnx.data (default: only when they "
        "reach 1.5 GiB, as every real model does).",
    ),
    click.option(
        "--stream/--no-stream",
        default=True,
        show_default=True,
        help="Trace on fake tensors and write each weight from the checkpoint as it is reached "
        "(peak memory about the largest tensor); --no-stream loads the whole model first "
        "(pickle checkpoints always do). Both write the same graph.",
    ),
    click.option(
        "--trace-layers",
        type=click.Choice(["kinds", "all"]),
        default="kinds",
        show_default=True,
        help="With --stream: kinds traces one decoder layer of each kind and copies it for the "
        "others of that kind (trace time flat in depth); all traces every layer. Both write "
        "the same computation, node for node.",
    ),
)

allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="Load pytorch_model*.bin pickles (runs code from the file; trusted input only).",
)


# --- the engine envelope and profiles (dsc build, dsc compile) ----------------------------------

envelope_options = group(
    click.option(
        "-p",
        "--profile",
        "profiles",
        multiple=True,
        help="Hardware profile(s): name, alias or .yaml path; a,b,c builds a matrix (repeatable).",
    ),
    set_option(
        "Override a profile field for every profile, e.g. builder.workspace_gb=4 (repeatable)."
    ),
    click.option(
        "--max-batch",
        type=click.IntRange(1),
        default=None,
        help="Engine envelope: largest batch (default: the profile's).",
    ),
    click.option(
        "--max-input-len",
        type=click.IntRange(1),
        default=None,
        help="Engine envelope: longest prompt (default: the profile's, capped).",
    ),
    click.option(
        "--max-kv",
        type=click.IntRange(1),
        default=None,
        help="Engine envelope: KV-cache capacity in tokens (default: the profile's, "
        "capped at the model's max_position_embeddings).",
    ),
    click.option(
        "--max-num-tokens",
        type=click.IntRange(1),
        default=None,
        help="Engine envelope: most tokens in one prefill pass; the prefill "
        "profile's batch is max(1, this // max-input-len) (default: the "
        "profile's, 8192).",
    ),
    click.option(
        "--backend",
        type=click.Choice(["auto", "tensorrt_rtx", "tensorrt"]),
        default="auto",
        show_default=True,
        help="auto: TensorRT-RTX where it can target the GPU, else standard "
        "TensorRT on the device (preflight + trtexec command elsewhere).",
    ),
    click.option(
        "--dla-core",
        type=int,
        default=None,
        help="Jetson AGX Orin / Orin NX: build for this DLA core with GPU fallback "
        "(standard TensorRT, on the device).",
    ),
    click.option(
        "--rebuild", is_flag=True, help="Run every stage even when its inputs are unchanged."
    ),
    click.option(
        "--config",
        "config_path",
        type=PATH,
        default=None,
        help="dsc.yaml with pinned options; flags given here override it.",
    ),
    json_option("Print one JSON document on stdout (progress stays on stderr)."),
    quiet_option(),
)


# --- quantization (dsc quantize, dsc build) -----------------------------------------------------


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


ALPHA = _Alpha()

quant_options = group(
    click.option("--int8", is_flag=True, help="INT8 (W8A8 with SmoothQuant; see --weight-only)."),
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
        type=PATH,
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
        type=ALPHA,
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
        "--calibrate-by",
        "calibrate_by",
        type=click.Choice(["auto", "layer", "graph"]),
        default="auto",
        show_default=True,
        help="Run the calibration windows one decoder layer at a time (layer: ONNX Runtime "
        "holds one layer's weights) or through the whole graph (graph); auto: by layer "
        "above 1 GiB of weights. Same statistics either way.",
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
        type=VOCAB,
        default=None,
        help="Also store lm_head quantized, weight-only: int8/fp8 per output "
        "channel, int4 per block of 128 (int4 SM80+, fp8 SM89+).",
    ),
    click.option(
        "--quantize-embedding",
        "quantize_embedding",
        type=VOCAB,
        default=None,
        help="Also store the embedding table quantized (per row; int4 per block "
        "of 128), dequantized before the gather.",
    ),
)


# --- the accuracy gate (dsc validate) -----------------------------------------------------------

gate_options = group(
    click.option(
        "--reference",
        default="fp16",
        show_default=True,
        help="fp16 (the artifact's FP16 export), an artifact directory, or a .onnx file.",
    ),
    click.option(
        "--data",
        type=PATH,
        default=None,
        help="Held-out text file (default: the held-out split of the shipped corpus).",
    ),
    click.option(
        "--thresholds",
        "thresholds",
        multiple=True,
        help="Override gate thresholds, e.g. max_ppl_delta=0.03,min_top1=0.9.",
    ),
    click.option(
        "--precision",
        type=GATE_PRECISIONS,
        default=None,
        help="Candidate precision for default thresholds (default: from the artifact).",
    ),
    click.option("--windows", type=click.IntRange(1), default=8, show_default=True),
    click.option("--window", type=click.IntRange(8), default=128, show_default=True),
    click.option("--prompts", type=click.IntRange(1), default=8, show_default=True),
    click.option("--gen-len", type=click.IntRange(1), default=32, show_default=True),
)


# --- a built engine at run time (dsc validate, dsc bench) ---------------------------------------

engine_run_options = group(
    click.option(
        "--engine",
        "engine",
        default=None,
        metavar="PROFILE",
        help="Run the engine built for PROFILE (on this GPU) instead of the ONNX "
        "graph in ONNX Runtime.",
    ),
    click.option(
        "--runtime",
        "engine_runtime",
        type=RUNTIMES,
        default=None,
        help="With --engine: the runtime (default: the engine's own; 'standin' is "
        "ONNX Runtime behind the TensorRT API, for machines without a GPU, "
        "never a measurement of TensorRT).",
    ),
    click.option(
        "--cuda-graphs/--no-cuda-graphs",
        "cuda_graphs",
        default=True,
        show_default=True,
        help="With --engine: run recurring decode shapes under CUDA graphs.",
    ),
)


def check_engine_options(engine: str | None, engine_runtime: str | None) -> None:
    """`--runtime` only with `--engine`."""
    if engine is None and engine_runtime is not None:
        raise click.UsageError("--runtime needs --engine PROFILE")
