"""Stage 1, export: checkpoint -> `model.onnx` (+ `.data`), `model_io.json`, tokenizer, config.

Inputs: the checkpoint's file hashes, dtype, opset, `--external-data`, the exporter's tool
versions (`dsc.manifest.export_inputs`). Run by `dsc build` and by `dsc export`.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import Future
from pathlib import Path

from dsc.artifacts import IO_SPEC
from dsc.manifest import export_inputs
from dsc.pipeline.progress import peak_rss_bytes, reset_peak_rss
from dsc.stages._base import Stage, StageRecord


class ExportStage(Stage):
    """Export a checkpoint (`dsc.models.checkpoint.CheckpointInfo`) into a directory."""

    name = "export"
    index = 1

    def inputs(
        self,
        info,
        *,
        dtype: str,
        opset: int | None,
        tools: dict,
        external_data: bool = False,
        stream: bool = True,
        trace_layers: str = "kinds",
        checkpoint=None,
    ) -> dict:
        return export_inputs(
            info,
            dtype=dtype,
            opset=opset,
            tools=tools,
            external_data=external_data,
            stream=stream and info.weight_format == "safetensors",
            trace_layers=trace_layers,
            checkpoint=checkpoint,
        )

    def run(
        self,
        info,
        directory: Path,
        inputs: dict,
        *,
        progress=None,
        say=None,
        quiet=False,
        hash_external_data: bool = False,
    ) -> tuple[StageRecord, object]:
        """Write the graph, its I/O spec, the tokenizer and config.json into `directory`.

        Returns (record, `dsc.export.onnx_export.ExportedGraph`; `hash_external_data`: with
        the data file's sha256, see `export_graph`). Raises `ExportError` / `CheckpointError`
        (exit 5 / 3) from the exporter."""
        from dsc.export import onnx_export

        dtype = inputs["dtype"]
        t0 = time.perf_counter()
        reset_peak_rss()
        g = onnx_export.export_graph(
            info,
            directory,
            dtype=dtype,
            opset=inputs["opset"],
            external_data=inputs["external_data"],
            stream=inputs["stream"],
            trace_layers=inputs["trace_layers"],
            progress=progress,
            quiet=quiet,
            hash_external_data=hash_external_data,
        )
        for f in info.tokenizer_files:
            shutil.copy2(f, directory / f.name)
        shutil.copy2(info.path / "config.json", directory / "config.json")
        (directory / IO_SPEC).write_text(json.dumps(dict(g.io_spec, dtype=dtype), indent=2) + "\n")
        if isinstance(inputs["checkpoint"], Future):  # hashed beside the export (dsc.api.export)
            inputs = dict(inputs, checkpoint=inputs["checkpoint"].result())
        seconds = time.perf_counter() - t0
        record = StageRecord(
            "ran",
            self.input_hash(inputs),
            inputs,
            {},
            round(seconds, 2),
            _with_writer(peak_rss_bytes(), g.writer_peak_rss_bytes),
            extra={"dtype": dtype, "opset": g.io_spec.get("opset")},
        )
        return record, g


def _with_writer(peak: int | None, writer: int | None) -> int | None:
    """The export's peak RSS counting its data-file writer (`dsc.export.prewrite`): the larger
    of this process's own peak and the two processes' largest sum while the writer ran
    (`PreWrite.peak_rss_bytes`)."""
    if peak is None or writer is None:
        return peak
    return max(peak, writer)
