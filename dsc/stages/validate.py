"""Stage 5, validate: the accuracy gate (quantized graph vs its fp16 reference) or the smoke check.

Gate inputs: the graph and reference hashes, the precision, the held-out text's hash, the gate
options and the ONNX Runtime version; its result is `validation.json`. `dsc validate` runs the
same gate (`ValidateStage.gate`, via `validate_artifact` here) on an existing artifact.
Smoke inputs: the graph hash, the tokens decoded, the prompt.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from dsc.artifacts import IO_SPEC
from dsc.errors import CheckFailed
from dsc.manifest import canonical_hash, graph_record
from dsc.models.checkpoint import sha256_file
from dsc.pipeline.progress import peak_rss_bytes, reset_peak_rss
from dsc.stages._base import Stage, link, reusable, reused

TOOLS = ("dsc", "onnxruntime")


class ValidateStage(Stage):
    """The accuracy gate for a quantized graph, the smoke check otherwise (or nothing)."""

    name = "validate"
    index = 5

    def kind(self, config) -> str:
        """gate, smoke or none, from `--validate` and whether the build quantizes."""
        if config.validate == "none":
            return "none"
        if config.validate == "gate" or (config.validate == "auto" and config.quantize):
            return "gate"
        return "smoke"

    def smoke_inputs(self, graph: dict, tokens: int, prompt: str, tools: dict) -> dict:
        return {
            "graph": graph["hash"],
            "kind": "smoke",
            "tokens": tokens,
            "prompt": prompt,
            "tools": {k: tools.get(k) for k in TOOLS},
        }

    def gate_inputs(
        self,
        graph: dict,
        reference_hash: str,
        precision: str,
        text: str,
        options: dict,
        tools: dict,
    ) -> dict:
        return {
            "graph": graph["hash"],
            "kind": "gate",
            "precision": precision,
            "reference": reference_hash,
            "data_sha256": canonical_hash(text),
            "options": options,
            "tools": {k: tools.get(k) for k in TOOLS},
        }

    def run(
        self,
        config,
        tmp: Path,
        io: dict,
        graph: dict,
        tools: dict,
        progress,
        old: dict | None,
        ran: dict,
        previous: Path | None = None,
    ) -> tuple[dict, dict | None]:
        """Returns (the stage's manifest record, the manifest's `validation` summary or None).

        Raises `CheckFailed` (exit 1) when the smoke check fails; a failed gate is returned
        (`passed` false) so the build can keep the rejected artifact as evidence."""
        return _validate(self, config, tmp, io, graph, tools, progress, old, ran, previous)

    def gate(
        self,
        candidate: Path,
        io: dict,
        reference: Path,
        ref_io: dict,
        ref_desc: str,
        tokenizer_dir: Path,
        text: str,
        *,
        precision: str,
        options,
        quiet: bool = False,
    ) -> dict:
        """The accuracy gate of the graph `candidate` against `reference` on `text`: the one
        implementation `dsc build` (its validate stage) and `dsc validate` both run.

        `io` / `ref_io`: the graphs' I/O specs (model_io.json); `ref_desc`: how validation.json
        names the reference; `tokenizer_dir`: the artifact holding the tokenizer; `precision`:
        the candidate's (picks the default thresholds); `options`: a
        `dsc.validate.gate.GateOptions`. Each graph is loaded when the gate gets to it and
        freed after (never both at once). Returns validation.json's document (`passed` false
        for a failed gate: not raised). Raises `BadInput` (exit 3) for text too short to fill
        one window."""
        from dsc.backends.onnxruntime.segmented import causal_lm
        from dsc.models.loading import load_tokenizer
        from dsc.validate.gate import run_gate

        # Above 1 GiB of weights each graph runs one decoder layer at a time (causal_lm).
        result = run_gate(
            lambda: causal_lm(candidate, io),
            lambda: causal_lm(reference, ref_io),
            load_tokenizer(tokenizer_dir),
            text,
            precision=precision,
            options=options,
            candidate_path=candidate,
            reference_path=reference,
            quiet=quiet,
        )
        result.extra.update(candidate=io["onnx"], reference=ref_desc)
        return result.to_json()


VALIDATE = ValidateStage()


def validate_artifact(
    artifact: str | Path,
    *,
    reference: str | Path = "fp16",
    data: str | Path | None = None,
    thresholds: dict | None = None,
    precision: str | None = None,
    options=None,
    write: bool = True,
    quiet: bool = False,
) -> dict:
    """`dsc validate`: the validate stage's gate (`VALIDATE.gate`) on an existing artifact.

    `reference`: "fp16" (the artifact's reference/ export, or the artifact itself when it is
    the fp16 export), an artifact directory or a .onnx file; `data`: held-out text file (None:
    the shipped held-out split); `thresholds`: overrides of the precision's defaults;
    `precision`: the candidate's (None: from the manifest); `options`: a `GateOptions`;
    `write`: record validation.json, the manifest's `validation` and the reports.
    Returns validation.json's document; a failed gate is returned (`passed` false), not raised.
    Raises `BadInput` (exit 3) for a missing artifact, reference or data."""
    from dsc.artifacts import load_io_spec, load_manifest
    from dsc.validate.gate import GateOptions
    from dsc.validate.run import (
        VALIDATION_FILE,
        candidate_precision,
        gate_summary,
        read_validation_text,
        record,
        resolve_reference,
    )

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    io = load_io_spec(artifact)
    cand_path = artifact / io["onnx"]
    text = read_validation_text(data)
    ref_path, ref_io, ref_desc = resolve_reference(artifact, reference)
    opts = options or GateOptions()
    if thresholds:
        opts.thresholds = dict(thresholds)
    prec = precision or candidate_precision(artifact, manifest, io)
    result = VALIDATE.gate(
        cand_path,
        io,
        ref_path,
        ref_io,
        ref_desc,
        artifact,
        text,
        precision=prec,
        options=opts,
        quiet=quiet,
    )
    if write:
        record(artifact, VALIDATION_FILE, "validation", result, gate_summary(result))
        from dsc.validate.report import write_reports

        write_reports(artifact)
    return result


def _validate(
    stage: ValidateStage,
    config,
    tmp: Path,
    io: dict,
    graph: dict,
    tools: dict,
    progress,
    old: dict | None,
    ran: dict,
    previous: Path | None = None,
) -> tuple[dict, dict | None]:
    from dsc.pipeline.smoke import PROMPT as prompt
    from dsc.pipeline.smoke import smoke_validate

    kind = stage.kind(config)
    if kind == "none":
        progress.say(progress.stage_line(stage.index, "validate", "not run (--validate none)"))
        return {"status": "not_run", "reason": "--validate none"}, None
    if kind == "gate":
        return _gate(stage, config, tmp, io, graph, tools, progress, old, ran, previous)
    inputs = stage.smoke_inputs(graph, config.validate_tokens, prompt, tools)
    ih = stage.input_hash(inputs)
    label = progress.stage_line(stage.index, "validate", "smoke check with ONNX Runtime")
    if old and old.get("input_hash") == ih and old.get("status") in ("ran", "reused", "skipped"):
        rec = dict(old, status="reused" if old.get("status") != "skipped" else "skipped")
        progress.say(f"{label}: reused (graph unchanged)")
        ran["validate"] = False
        return rec, validation_summary(rec["result"])
    progress.say(f"{label} ...")
    t0 = time.perf_counter()
    reset_peak_rss()
    result = smoke_validate(tmp, io, tokens=config.validate_tokens, prompt=prompt)
    ran["validate"] = True
    seconds = round(time.perf_counter() - t0, 2)
    if result["status"] == "skipped":
        progress.say(f"{label}: skipped ({result['reason']})")
        return (
            {
                "status": "skipped",
                "reason": result["reason"],
                "input_hash": ih,
                "inputs": inputs,
                "outputs": {},
                "seconds": seconds,
                "result": result,
            },
            validation_summary(result),
        )
    if not result["passed"]:
        raise CheckFailed(
            f"validation (smoke) of {io['onnx']} failed: {'; '.join(result['failures'])}"
        )
    progress.say(
        progress.stage_line(
            5,
            "validate",
            f"smoke check passed: finite logits, {len(result['generated_tokens'])} "
            f"greedy tokens, decode = prefill to {result['kv_rel_diff']:.1e}, {seconds:.1f}s",
        )
    )
    progress.detail(f"smoke: generated token ids {result['generated_tokens']}")
    return (
        {
            "status": "ran",
            "input_hash": ih,
            "inputs": inputs,
            "outputs": {},
            "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "result": result,
        },
        validation_summary(result),
    )


def _gate(
    stage: ValidateStage,
    config,
    tmp: Path,
    io: dict,
    graph: dict,
    tools: dict,
    progress,
    old: dict | None,
    ran: dict,
    previous: Path | None,
) -> tuple[dict, dict]:
    """The accuracy gate: the quantized graph against its fp16 reference, on held-out text.

    A failed gate fails the build (exit 1): OUT is left as it was. The record and
    validation.json are those `dsc validate` writes.
    """
    from dsc.validate.gate import GateOptions
    from dsc.validate.run import REFERENCE_DIR, VALIDATION_FILE, default_text, gate_summary

    ref_dir = tmp / REFERENCE_DIR
    ref_io = json.loads((ref_dir / IO_SPEC).read_text())
    text = default_text()
    inputs = stage.gate_inputs(
        graph,
        graph_record(ref_dir, ref_io)["hash"],
        config.quantize,
        text,
        asdict(GateOptions()),
        tools,
    )
    ih = stage.input_hash(inputs)
    label = progress.stage_line(
        stage.index,
        "validate",
        f"accuracy gate ({config.quantize} vs {config.dtype} reference, ONNX Runtime)",
    )
    if reusable(old, ih, previous) and isinstance(old.get("result"), dict):
        link(previous, tmp, old["outputs"])
        progress.say(f"{label}: reused (graph and reference unchanged)")
        ran["validate"] = False
        return reused(old), old["result"]
    progress.say(f"{label} ...")
    t0 = time.perf_counter()
    reset_peak_rss()
    result = stage.gate(
        tmp / io["onnx"],
        io,
        ref_dir / ref_io["onnx"],
        ref_io,
        f"{REFERENCE_DIR}/ ({config.dtype} graph before quantization)",
        tmp,
        text,
        precision=config.quantize,
        options=GateOptions(),
        quiet=progress.quiet,
    )
    ran["validate"] = True
    seconds = round(time.perf_counter() - t0, 2)
    p = result["perplexity"]
    # A failed gate's record is written too: `build` keeps the rejected artifact as evidence.
    (tmp / VALIDATION_FILE).write_text(json.dumps(result, indent=2) + "\n")
    progress.say(
        progress.stage_line(
            5,
            "validate",
            f"accuracy gate {'passed' if result['passed'] else 'FAILED'}: "
            f"perplexity {p['delta']:+.2%}, top-1 {result['prefill']['top1']:.3f}, cosine p01 "
            f"{result['prefill']['cosine_p01']:.4f}, {seconds:.1f}s",
        )
    )
    summary = gate_summary(result)
    rec = {
        "status": "ran",
        "input_hash": ih,
        "inputs": inputs,
        "outputs": {VALIDATION_FILE: sha256_file(tmp / VALIDATION_FILE)},
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "result": summary,
    }
    return rec, summary


def validation_summary(result: dict) -> dict:
    keys = (
        "kind",
        "status",
        "passed",
        "reason",
        "backend",
        "graph",
        "dtype",
        "prompt_tokens",
        "generated_tokens",
        "text",
        "finite",
        "kv_rel_diff",
        "kv_rel_diff_exact_graph",
        "kv_checked_without_activation_qdq",
        "greedy_agreement",
        "note",
    )
    return {k: result[k] for k in keys if k in result}
