"""Writing an artifact: the previous one at OUT, reuse, the final manifest, rejection.

`previous_artifact` finds what `dsc build` may reuse at OUT; `finish` writes build.log, the
reports and the manifest into the temporary directory before `atomic_dir` swaps it in;
`keep_rejected` moves an artifact a failed gate rejected to OUT.rejected.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dsc.artifacts import IO_SPEC, check_output, is_artifact, load_manifest
from dsc.build_config import BuildConfig
from dsc.errors import OutputConflict
from dsc.manifest import canonical_hash, hash_tree, write_manifest
from dsc.outcome import BUILD_LOG
from dsc.stages._base import link

REPORTS = ("report.json", "report.md", "report.html")
# Files `dsc validate` / `dsc bench` add; kept across a rebuild when the graph is unchanged.
DOWNSTREAM_KEYS = ("bench",)


class UpToDate(Exception):
    """Raised inside atomic_dir to drop the new copy when it would equal the old artifact."""


def previous_artifact(
    output: Path, checkpoint: Path, checkpoint_hashes: dict, *, force: bool
) -> tuple[Path | None, dict]:
    """The artifact already at OUT that this build may reuse, and its manifest.

    An artifact of the same checkpoint (same directory, or same content elsewhere) is updated
    in place; one of another checkpoint is replaced only with --force.
    """
    if not output.exists():
        check_output(output, force=True)  # an output path under a file is refused here
        return None, {}
    if output.is_file() or output.is_symlink():
        raise OutputConflict(f"output path {output} is a file, not a directory")
    if not any(output.iterdir()):
        return None, {}
    if not is_artifact(output):
        raise OutputConflict(
            f"output path {output} is not empty and is not a dsc artifact; choose another path"
        )
    m = load_manifest(output)
    src = m.get("source", {})
    same = src.get("inputs") == checkpoint_hashes or src.get("checkpoint") == str(
        Path(checkpoint).resolve()
    )
    if not same and not force:
        raise OutputConflict(
            f"output path {output} holds an artifact of another checkpoint "
            f"({m.get('source', {}).get('checkpoint', '?')}); pass --force to replace it"
        )
    return output, m


def fix_report_paths(root: Path, dest: Path) -> None:
    """report.* name the directory they were generated in: the temp dir, until the swap."""
    import html

    from markupsafe import escape

    pairs = []
    for a, b in ((str(root.resolve()), str(dest.resolve())), (str(root), str(dest))):
        # as written in report.json, and as Jinja2 (markupsafe) or html.escape write it
        pairs += [
            (a, b),
            (json.dumps(a)[1:-1], json.dumps(b)[1:-1]),
            (str(escape(a)), str(escape(b))),
            (html.escape(a), html.escape(b)),
        ]
    for name in REPORTS:
        p = root / name
        if p.is_file():
            text = p.read_text()
            for a, b in pairs:
                text = text.replace(a, b)
            p.write_text(text)


def finish(tmp: Path, dest: Path, manifest: dict, progress, *, check: bool = True) -> dict:
    """Write build.log, the reports and the final manifest (outputs: every file) into `tmp`."""
    from dsc.validate.report import write_reports

    (tmp / BUILD_LOG).write_text(progress.text())
    manifest["outputs"] = hash_tree(tmp)
    write_manifest(tmp, manifest, check=check)
    write_reports(tmp)
    fix_report_paths(tmp, dest)
    manifest["outputs"] = hash_tree(tmp)
    write_manifest(tmp, manifest, check=check)
    return manifest


def rejected_path(output: Path) -> Path:
    return output.with_name(f"{output.name}.rejected")


def keep_rejected(tmp: Path, output: Path) -> str:
    """Move the artifact a failed gate rejected to OUT.rejected (replacing an earlier rejected
    artifact, never anything else); returns the clause the error line ends with."""
    rejected = rejected_path(output)
    if rejected.exists() or rejected.is_symlink():
        if rejected.is_symlink() or not rejected.is_dir() or not is_artifact(rejected):
            return (
                f"the rejected artifact was not kept ({rejected} exists and is not a dsc artifact)"
            )
        shutil.rmtree(rejected)
    os.replace(tmp, rejected)
    return f"the rejected artifact, with its report, is at {rejected}"


def gate_failure(precision: str | None, summary: dict, kept: str) -> str:
    """The error line of a failed gate: the failing metrics, where the error jumps, the evidence."""
    fd = summary.get("first_divergence") or {}
    where = f"; first divergence at layer {fd['layer']} ({fd['module']})" if fd else ""
    return f"accuracy gate ({precision}) failed: {'; '.join(summary['failures'])}{where}; {kept}"


def carry_downstream(
    previous: Path | None, old: dict, tmp: Path, manifest: dict, graph: dict
) -> None:
    """Keep `dsc validate` / `dsc bench` records of the same graph (same graph hash)."""
    if previous is None or (old.get("graph") or {}).get("hash") != graph["hash"]:
        return
    produced = set(hash_tree(tmp)) | {BUILD_LOG, *REPORTS}
    extra = [
        rel
        for rel in (old.get("outputs") or {})
        if rel not in produced and not rel.startswith("engines/") and (previous / rel).is_file()
    ]
    link(previous, tmp, extra)
    gate = old.get("validation")
    if isinstance(gate, dict) and gate.get("kind") == "gate":
        manifest["validation"] = gate
    for key in DOWNSTREAM_KEYS:
        if key in old:
            manifest[key] = old[key]


# What `dsc compile` takes from the options `dsc build` recorded, unless given again: the device
# build then matches the preflight and the trtexec.sh written where the artifact was made.
INHERITED = ("overrides", "max_batch", "max_input_len", "max_kv", "max_num_tokens", "dla_core")


def inherit(config: BuildConfig, recorded: dict) -> BuildConfig:
    from dataclasses import replace

    changes = {}
    for key in INHERITED:
        if getattr(config, key) in (None, ()) and recorded.get(key) not in (None, [], ()):
            value = recorded[key]
            changes[key] = tuple(value) if isinstance(value, list) else value
    return replace(config, **changes) if changes else config


def graph_of(io: dict, listed: dict) -> dict:
    """`graph_record` of a verified artifact, from its manifest's hashes (no second read)."""
    onnx_name = str(io["onnx"])
    files = {n: listed[n] for n in (onnx_name, f"{onnx_name}.data", IO_SPEC) if n in listed}
    return {
        "onnx": onnx_name,
        "dtype": io.get("dtype"),
        "opset": io.get("opset"),
        "files": files,
        "hash": canonical_hash(files),
    }
