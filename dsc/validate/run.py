"""`dsc bench` on an artifact, and what `dsc validate` (`dsc.stages.validate.validate_artifact`)
shares with it: resolve the graphs, record the results.

The candidate is the artifact's `model.onnx` (the graph handed to the builder). The reference,
by default `fp16`, is the FP16 export kept in `reference/` by stages that change the graph
(passes, quantization). An artifact with no `reference/` is itself the FP16 export, so it is
compared with itself and must pass: that is the gate's control case. `--reference PATH` takes
another artifact directory or a `.onnx` file with the same interface.

Results go into the artifact: `validation.json` / `bench.json`, a summary under `validation` /
`bench` in manifest.json (with the new files' sha256 in `outputs`), and the reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dsc import signals
from dsc.artifacts import IO_SPEC, MANIFEST, load_io_spec, load_manifest
from dsc.errors import BadInput
from dsc.models.checkpoint import sha256_file
from dsc.paths import check_graph_file

REFERENCE_DIR = "reference"
VALIDATION_FILE = "validation.json"
BENCH_FILE = "bench.json"


def candidate_precision(artifact: Path, manifest: dict, io: dict) -> str:
    quant = manifest.get("stages", {}).get("quantize", {})
    if isinstance(quant, dict) and quant.get("precision"):
        return str(quant["precision"])
    return str(manifest.get("precision") or io.get("dtype") or "fp16")


def resolve_reference(artifact: Path, reference: str | Path) -> tuple[Path, dict, str]:
    """(onnx path, io spec, description) of the reference graph."""
    artifact = Path(artifact)
    if str(reference) == "fp16":
        ref_dir = artifact / REFERENCE_DIR
        if (ref_dir / IO_SPEC).is_file():
            io = load_io_spec(ref_dir, check_manifest=False)
            check_graph_file(ref_dir / io["onnx"])
            return ref_dir / io["onnx"], io, f"{REFERENCE_DIR}/ (fp16 export)"
        io = load_io_spec(artifact)
        if io.get("dtype", "fp16") != "fp16":
            raise BadInput(
                f"{artifact} holds a {io.get('dtype')} export and no fp16 reference; "
                "pass --reference PATH"
            )
        return artifact / io["onnx"], io, "self (the artifact is the fp16 export)"
    path = Path(reference)
    if path.is_dir():
        io = load_io_spec(path)
        return path / io["onnx"], io, str(path)
    if path.is_file() and path.suffix == ".onnx":
        return check_graph_file(path), load_io_spec(artifact), str(path)
    raise BadInput(f"reference not found: {reference} (use fp16, an artifact dir or a .onnx file)")


def default_text() -> str:
    """The held-out split of the shipped corpus: the gate's default data (never calibrated on)."""
    from dsc.corpus import heldout_text

    return heldout_text()


def record(artifact: Path, filename: str, key: str, data: dict, summary: dict) -> None:
    """Write `filename` into the artifact and note it in the manifest (atomic per file)."""
    artifact = Path(artifact)
    path = artifact / filename
    manifest = load_manifest(artifact)
    with signals.deferred():  # both files or neither; no temporary file left behind
        tmp = path.with_name(f".{filename}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        manifest[key] = summary
        manifest.setdefault("outputs", {})[filename] = sha256_file(path)
        # The file is this command's now: a stage that wrote an earlier version no longer
        # describes it (verify compares stage records with outputs).
        for st in (manifest.get("stages") or {}).values():
            if isinstance(st, dict) and isinstance(st.get("outputs"), dict):
                st["outputs"].pop(filename, None)
        mtmp = artifact / f".{MANIFEST}.tmp"
        mtmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(mtmp, artifact / MANIFEST)


def gate_summary(result: dict) -> dict:
    """The manifest's `validation` record of a gate result (validation.json holds the rest)."""
    summary = {k: result[k] for k in ("kind", "precision", "passed", "failures")}
    summary["perplexity_delta"] = result["perplexity"]["delta"]
    summary["top1_prefill"] = result["prefill"]["top1"]
    summary["first_divergence"] = result.get("first_divergence")
    return summary


def read_validation_text(data: str | Path | None) -> str:
    """The held-out text: the shipped split, or a regular file of at most 256 MiB."""
    if data is None:
        return default_text()
    from dsc.paths import read_text_bounded

    p = Path(data)
    if not p.exists():
        raise BadInput(f"validation data not found: {p}")
    return read_text_bounded(
        p, what="validation data", kind="text", limit=256 * 2**20, errors="replace"
    )


def bench_artifact(
    artifact: str | Path,
    *,
    batches=(1,),
    prompt_lens=(128,),
    gen_len: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    profile: str | None = None,
    write: bool = True,
) -> dict:
    from dsc.backends.onnxruntime.runner import OrtCausalLM
    from dsc.validate.bench import bench

    artifact = Path(artifact)
    runner = OrtCausalLM.from_artifact(artifact)
    result = bench(
        runner,
        onnx_path=artifact / runner.io["onnx"],
        batches=batches,
        prompt_lens=prompt_lens,
        gen_len=gen_len,
        warmup=warmup,
        repeats=repeats,
    )
    if profile:
        result["target"] = _target_ceiling(artifact, profile, batches, prompt_lens, gen_len)
    if write:
        summary = {
            "backend": result["backend"],
            "rows": [
                {k: r[k] for k in ("batch", "prompt_len", "decode_tokens_per_s")}
                | {"ttft_p50_ms": r["ttft"]["p50_ms"], "tpot_p50_ms": r["tpot"]["p50_ms"]}
                for r in result["rows"]
            ],
        }
        record(artifact, BENCH_FILE, "bench", result, summary)
        from dsc.validate.report import write_reports

        write_reports(artifact)
    return result


def _target_ceiling(artifact: Path, profile: str, batches, prompt_lens, gen_len) -> dict:
    from dsc.hardware import load_profile
    from dsc.plan import plan

    prof = load_profile(profile)
    io = load_io_spec(artifact)
    precision = io.get("dtype", "fp16")
    if precision == "fp32":
        precision = "fp16"
    rows = []
    for b in batches:
        for length in prompt_lens:
            p = plan(artifact / "config.json", prof, precision, batch=b, context=length + gen_len)
            rows.append(
                {
                    "batch": b,
                    "prompt_len": length,
                    "decode_ceiling_tokens_per_s": p.decode_tokens_per_s,
                }
            )
    return {
        "profile": prof.name,
        "precision": precision,
        "rows": rows,
        "note": "ceiling on the target GPU from its bandwidth; the timings above are not "
        "from that GPU, so no fraction of it is claimed",
    }
