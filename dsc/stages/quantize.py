"""Stage 3, quantize: calibrate and insert Q/DQ (`dsc.quantize`), in place.

Inputs: the upstream stage's input hash, the precision and calibration options, the sha256 of
the calibration text, the vocabulary options and the tool versions. The input graph moves to
`reference/` (what the accuracy gate compares against). Run by `dsc build` and by
`dsc quantize` (which writes a new artifact with a `stages.quantize` record).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from dsc import signals
from dsc.artifacts import MANIFEST, atomic_dir, data_file, load_io_spec, load_manifest
from dsc.errors import BadInput, Unsupported
from dsc.pipeline.progress import peak_rss_bytes, reset_peak_rss
from dsc.quantize import (
    QuantizeResult,
    calibration_sha256,
    check_legal,
    check_vocab_options,
    quant_outputs,
    quantize_in_place,
    vocab_inputs,
    vocab_precisions,
)
from dsc.stages._base import Stage, StageRecord
from dsc.stages.optimize import upstream_hash

TOOLS = ("dsc", "onnxruntime", "onnx-ir")
logger = logging.getLogger(__name__)


def check_same_filesystem(artifact: Path, output: Path) -> None:
    """`BadInput` (exit 3) unless `output` (or its nearest existing parent) is on the
    filesystem of `artifact`: a rename cannot move a file across filesystems."""
    parent = Path(output).absolute()
    while not parent.exists():
        parent = parent.parent
    if os.stat(parent).st_dev != os.stat(artifact).st_dev:
        raise BadInput(
            f"--move-input: {output} is on another filesystem than {artifact}; "
            "write the output beside the input, or drop --move-input to copy"
        )


class QuantizeStage(Stage):
    name = "quantize"
    index = 3

    def inputs(
        self,
        upstream: str,
        tools: dict,
        precision: str,
        *,
        weight_only: bool = False,
        method: str | None = None,
        alpha: float | None = None,
        samples: int = 64,
        seq_len: int = 128,
        exclude=(),
        calib=None,
        lm_head: str | None = None,
        embedding: str | None = None,
        calibrate_by: str = "auto",
    ) -> dict:
        """The stage's inputs; reads the calibration data (`BadInput` when it is unusable).
        `calibrate_by` is an input only when set ("layer" or "graph"): "auto" decides by the
        graph's size, which the upstream hash already covers."""
        return {
            "upstream": upstream,
            "precision": precision,
            "weight_only": weight_only or precision == "int4",
            "method": method,
            "alpha": "auto" if alpha is None else alpha,
            "samples": samples,
            "seq_len": seq_len,
            "exclude": list(exclude),
            "calib_sha256": calibration_sha256(calib),
            "tools": {k: tools.get(k) for k in TOOLS},
            **vocab_inputs(lm_head, embedding),
            **({"calibrate_by": calibrate_by} if calibrate_by != "auto" else {}),
        }

    def run(
        self,
        directory: Path,
        inputs: dict,
        *,
        calib=None,
        alpha: float | None = None,
        lm_head: str | None = None,
        embedding: str | None = None,
        progress=None,
        weights_dir: Path | None = None,
    ) -> tuple[StageRecord, dict]:
        """Quantize the graph in `directory`; returns (record, quant report). `weights_dir`:
        where its external data file is when not beside it (`dsc.quantize.quantize_in_place`)."""
        t0 = time.perf_counter()
        reset_peak_rss()
        report, extra = quantize_in_place(
            directory,
            inputs["precision"],
            calib=calib,
            method=inputs["method"],
            samples=inputs["samples"],
            seq_len=inputs["seq_len"],
            alpha=alpha,
            weight_only=inputs["weight_only"] and inputs["precision"] != "int4",
            exclude=tuple(inputs["exclude"]),
            lm_head=lm_head,
            embedding=embedding,
            progress=progress,
            calibrate_by=inputs.get("calibrate_by", "auto"),
            weights_dir=weights_dir,
        )
        seconds = time.perf_counter() - t0
        rec = StageRecord(
            "ran",
            self.input_hash(inputs),
            inputs,
            {},
            round(seconds, 2),
            peak_rss_bytes(),
            extra=extra,
        )
        return rec, report


def quantize_artifact(
    artifact: str | Path,
    output: str | Path,
    precision: str,
    *,
    calib: str | Path | None = None,
    method: str | None = None,
    samples: int = 64,
    seq_len: int = 128,
    alpha: float | None = None,
    weight_only: bool = False,
    exclude=(),
    profile=None,
    force: bool = False,
    lm_head: str | None = None,
    embedding: str | None = None,
    progress=None,
    calibrate_by: str = "auto",
    move_input: bool = False,
) -> QuantizeResult:
    """`dsc quantize`: the quantize stage on `artifact`'s graph, into a new artifact `output`.

    `profile` (a name, YAML path or loaded profile) refuses precisions the target cannot run,
    before any work: `Unsupported` (exit 4). `BadInput` (exit 3): an unknown precision or
    method, an already quantized input, `output` equal to or inside the input, or with
    `move_input` an `output` on another filesystem.

    `move_input`: the input's external data file (the weights: 31 GB for DeepSeek-V2-Lite in
    fp16) becomes the new artifact's `reference/` data file by a rename instead of a copy, as
    the last step before the new artifact appears, and the input artifact is then removed. The
    quantized graph reads the weights it keeps from the input until then. If anything fails
    before the new artifact is complete, the file is moved back and the input is unchanged."""
    from dsc.manifest import (
        graph_record,
        hash_tree,
        sha256_file,
        tool_versions,
        write_derived_manifest,
    )
    from dsc.passes.quant.ranges import METHODS
    from dsc.quantize import model_config

    t0 = time.perf_counter()
    check_legal(precision, profile)
    check_vocab_options(lm_head, embedding, precision, model_config(artifact))
    for flag, p in vocab_precisions(lm_head, embedding).items():
        try:
            check_legal(p, profile)
        except Unsupported as e:
            raise Unsupported(f"--quantize-{flag} {p}: {e}") from None
    if method is not None and method not in METHODS:
        raise BadInput(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    artifact, output = Path(artifact), Path(output)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    if (artifact / "reference").exists() or manifest.get("stages", {}).get("quantize", {}).get(
        "status"
    ) in ("ran", "reused"):
        raise BadInput(f"{artifact} is already quantized; quantize its fp16 export instead")
    if output.absolute() == artifact.absolute():
        raise BadInput("the output must be a new directory, not the input artifact")
    if output.resolve().is_relative_to(artifact.resolve()):
        raise BadInput(f"the output must not be inside the input artifact {artifact}")
    src_data = artifact / data_file(io["onnx"])
    moving = move_input and src_data.is_file()
    if moving:
        check_same_filesystem(artifact, output)
    stage = QuantizeStage()
    upstream = (
        upstream_hash(manifest)
        or (manifest.get("graph") or {}).get("hash")
        or graph_record(artifact, io)["hash"]
    )
    inputs = stage.inputs(
        upstream,
        tool_versions(("onnx-ir", "onnxruntime")),
        precision,
        weight_only=weight_only,
        method=method,
        alpha=alpha,
        samples=samples,
        seq_len=seq_len,
        exclude=exclude,
        calib=calib,
        lm_head=lm_head,
        embedding=embedding,
        calibrate_by=calibrate_by,
    )
    moved: list[tuple[Path, Path]] = []
    with atomic_dir(output, force=force, moved_in=moved) as tmp:
        for p in artifact.iterdir():
            if p.name == MANIFEST or p.name == "engines":
                continue  # engines of the float graph do not belong to the quantized one
            if moving and p.name == src_data.name:
                continue  # moved to reference/ at the end
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        rec, report = stage.run(
            tmp,
            inputs,
            calib=calib,
            alpha=alpha,
            lm_head=lm_head,
            embedding=embedding,
            progress=progress,
            weights_dir=artifact if moving else None,
        )
        if profile is not None:
            rec.extra["profile"] = getattr(profile, "name", str(profile))
        outputs = hash_tree(tmp)
        if moving:
            outputs[f"reference/{src_data.name}"] = sha256_file(src_data)
            outputs = dict(sorted(outputs.items(), key=lambda kv: Path(kv[0])))  # hash_tree's
        rec.outputs = quant_outputs(outputs, io["onnx"])
        stages = dict(manifest.get("stages", {}), quantize=rec.to_json())
        # Engines of the input graph are not copied: their records go too.
        new = {k: v for k, v in manifest.items() if k not in ("profiles", "validation")}
        stages.pop("compile", None)
        stages.pop("validate", None)
        new_io = load_io_spec(tmp, check_manifest=False)
        new.update(
            stages=stages,
            graph=graph_record(tmp, new_io, outputs),
            outputs=outputs,
            precision=precision,
        )
        write_derived_manifest(tmp, new, manifest, artifact)
        if moving:
            # Last, so that a failure anywhere before leaves the input whole; atomic_dir moves
            # the file back if the swap itself fails.
            inside = tmp / "reference" / src_data.name
            with signals.deferred():
                os.replace(src_data, inside)
                moved.append((src_data, inside))
    if move_input:
        shutil.rmtree(artifact, ignore_errors=True)
        logger.info("moved the weights of %s to %s/reference and removed it", artifact, output)
    seconds = round(time.perf_counter() - t0, 2)
    return QuantizeResult(
        output,
        precision,
        report["scheme"],
        rec.extra["method"],
        len(report["layers"]),
        report["excluded"],
        report["experts"]["under_calibrated"],
        seconds,
        report,
    )
