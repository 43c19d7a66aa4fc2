"""The library behind the CLI: one function per command.

Every function validates its input before heavy work, raises `dsc.errors.DscError` subclasses
for anything the user can fix, and writes output directories atomically (`dsc.artifacts`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from dsc.artifacts import (
    MANIFEST,
    atomic_dir,
    check_output,
    write_json,
)
from dsc.errors import BadInput, UsageError
from dsc.manifest import tool_versions
from dsc.models.checkpoint import inspect_checkpoint
from dsc.models.loading import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    onnx_path: Path
    family: str
    architecture: str
    dtype: str
    num_layers: int
    cache_kind: str
    seconds: float


def _progress(msg: str) -> None:
    print(f"[dsc] {msg}", file=sys.stderr, flush=True)


def export(
    checkpoint: str | Path,
    output: str | Path,
    *,
    dtype: str = "fp16",
    opset: int | None = None,
    external_data: bool = False,
    allow_pickle: bool = False,
    force: bool = False,
    progress=_progress,
) -> ExportResult:
    """Export a checkpoint to an artifact directory holding the ONNX graph and its I/O spec.

    `external_data`: always write the weights to `model.onnx.data` (they go there anyway at
    1.5 GiB and above)."""
    from dsc.precision import GRAPH_DTYPES
    from dsc.stages.export import ExportStage

    if dtype not in GRAPH_DTYPES:
        raise UsageError(f"unsupported export dtype {dtype!r}; choose fp32, fp16 or bf16")
    if opset is not None and not 18 <= opset <= 23:
        raise UsageError(f"opset {opset} is not supported by the exporter; choose 18..23")
    info = inspect_checkpoint(checkpoint, allow_pickle=allow_pickle)
    output = Path(output)
    check_output(output, force=force)  # before any output, so a refusal is the only line
    progress(f"checked {info.path}: {info.architecture} → family {info.family.name}")
    stage = ExportStage()
    tools = tool_versions()
    inputs = stage.inputs(info, dtype=dtype, opset=opset, tools=tools, external_data=external_data)
    with atomic_dir(output, force=force) as tmp:
        record, graph = stage.run(info, tmp, inputs, progress=progress)
        io = dict(graph.io_spec, dtype=dtype)
        progress("hashing inputs and outputs")
        from dsc.manifest import export_manifest

        manifest = export_manifest(info, tmp, io, record.to_json(), tools=tools)
        write_json(tmp / MANIFEST, manifest)
    progress(f"artifact written to {output}")
    return ExportResult(
        path=output,
        onnx_path=output / graph.onnx_path.name,
        family=info.family.name,
        architecture=info.architecture,
        dtype=dtype,
        num_layers=io["cache"]["num_layers"],
        cache_kind=io["cache"]["kind"],
        seconds=graph.seconds,
    )


def run(
    artifact: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Generate a continuation of `prompt` through the artifact's ONNX graph."""
    import math

    from dsc.backends.onnxruntime.runner import OrtCausalLM

    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"temperature must be a positive number, got {temperature}")
    if seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed}")
    runner = OrtCausalLM.from_artifact(Path(artifact))
    tok = load_tokenizer(artifact)
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise BadInput("the prompt encodes to no tokens")
    eos = runner.io.get("eos_token_id")
    new = runner.generate(
        [ids],
        max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        seed=seed,
        eos_token_id=eos if isinstance(eos, int) else None,
    )[0]
    return prompt + tok.decode(new, skip_special_tokens=True)


# --- dsc build / compile / inspect / verify (dsc.build, dsc.manifest) ---------------------------


def build(
    checkpoint: str | Path,
    output: str | Path,
    config=None,
    *,
    quiet: bool = False,
    echo=None,
    **options,
):
    """`dsc build`: export → (passes) → (quantize) → compile per profile → validate, with reuse.

    `config` is a `dsc.build.BuildConfig`, or pass its fields as keyword arguments.
    Returns a `dsc.build.BuildOutcome`.
    """
    from dsc.build import BuildConfig
    from dsc.build import build as run_build

    config = config or BuildConfig(**options)
    return run_build(checkpoint, output, config, quiet=quiet, echo=echo)


def compile_artifact(
    artifact: str | Path, config=None, *, quiet: bool = False, echo=None, **options
):
    """`dsc compile`: engines (or preflights) for more profiles, into an existing artifact."""
    from dsc.build import BuildConfig
    from dsc.build import compile_artifact as run_compile

    config = config or BuildConfig(**options)
    return run_compile(artifact, config, quiet=quiet, echo=echo)


def inspect_artifact(artifact: str | Path) -> dict:
    """`dsc inspect`: a summary of an artifact's manifest."""
    from dsc.manifest import inspect_artifact as summarise

    return summarise(artifact)


def verify_artifact(
    artifact: str | Path, *, check_inputs: bool = False, checkpoint: str | Path | None = None
):
    """`dsc verify`: re-hash every file against the manifest (a `dsc.manifest.VerifyResult`)."""
    from dsc.manifest import verify_artifact as verify

    return verify(artifact, check_inputs=check_inputs, checkpoint=checkpoint)
