"""Stage 5, validate: the accuracy gate (quantized graph vs its fp16 reference) or the smoke check.

Gate inputs: the graph and reference hashes, the precision, the held-out text's hash, the gate
options and the ONNX Runtime version; its result is `validation.json` (what `dsc validate`
writes, `dsc.validate.run`). Smoke inputs: the graph hash, the tokens decoded, the prompt.
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
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.models.loading import load_tokenizer
    from dsc.validate.gate import GateOptions, run_gate
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
    # Each graph is loaded when the gate gets to it and freed after (never both at once).
    result = run_gate(
        lambda: OrtCausalLM(tmp / io["onnx"], io),
        lambda: OrtCausalLM(ref_dir / ref_io["onnx"], ref_io),
        load_tokenizer(tmp),
        text,
        precision=config.quantize,
        options=GateOptions(),
        candidate_path=tmp / io["onnx"],
        reference_path=ref_dir / ref_io["onnx"],
        quiet=progress.quiet,
    )
    result["candidate"] = io["onnx"]
    result["reference"] = f"{REFERENCE_DIR}/ ({config.dtype} graph before quantization)"
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
