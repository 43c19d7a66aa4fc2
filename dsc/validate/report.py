"""Build reports of an artifact: report.json (schema: dsc/schemas/report.schema.json),
report.md (for terminals and PR comments) and a self-contained report.html (inline CSS and SVG
plots; no script, no network, no other file).

Everything is regenerated from the files in the artifact (`dsc report ARTIFACT`): the manifest
(stages, profiles, validation summary), `validation*.json`, `bench.json`, `passes_report.json`
and `quant_report.json`. `dsc.validate._report_view` decides what the report says; Jinja2
templates (`dsc/validate/templates/`) write it as markdown and HTML; matplotlib draws the plots
(`dsc.validate._report_plots`).

report.html opens with what a release engineer decides on: the verdict (with the failing
metrics), model and precision, one row per hardware profile (SM, engine, TensorRT version, plan
fit, decode ceiling) and the total build time; then accuracy, memory, stages, passes,
quantization and latency; hashes and raw records last, collapsed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dsc.artifacts import MANIFEST, load_manifest

REPORT_SCHEMA_VERSION = 1


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _profile_record(entry: dict) -> dict:
    """A manifest profile entry without the hardware profile's sources and notes."""
    out = dict(entry)
    prof = entry.get("profile") or {}
    out["profile"] = {
        k: prof[k]
        for k in ("name", "description", "compute_capability", "memory", "tensorrt")
        if k in prof
    }
    return out


def collect(artifact: str | Path) -> dict:
    """report.json's record of `artifact`: the manifest's source, stages, profiles, validation
    summary and output hashes, with every validation*.json, bench.json, passes_report.json and
    quant_report.json found (None when absent or unreadable).

    Raises `dsc.errors.BadInput` (exit 3) when `artifact` is not a readable dsc artifact."""
    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    validations = []
    for p in sorted(artifact.glob("validation*.json")):
        v = _load(p)
        if v:
            v["file"] = p.name
            validations.append(v)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "artifact": str(artifact.resolve()),
        "created": manifest.get("created"),
        "tools": manifest.get("tools", {}),
        "precision": manifest.get("precision"),
        "graph": {k: v for k, v in (manifest.get("graph") or {}).items() if k != "files"},
        "model": manifest.get("source", {}),
        "stages": manifest.get("stages", {}),
        "profiles": {
            name: _profile_record(p) for name, p in (manifest.get("profiles") or {}).items()
        },
        "validation": manifest.get("validation"),
        "validations": validations,
        "bench": _load(artifact / "bench.json"),
        # `dsc bench --engine P` / `dsc device-check`: one per profile (dsc.runtime.evaluate)
        "engine_benches": [
            b for p in sorted(artifact.glob("bench-engine-*.json")) if (b := _load(p))
        ],
        "passes": _load(artifact / "passes_report.json"),
        "quantization": _load(artifact / "quant_report.json"),
        "outputs": {
            k: v
            for k, v in (manifest.get("outputs") or {}).items()
            if k not in ("report.json", "report.md", "report.html")
        },
    }


# --- documents ----------------------------------------------------------------------------------


def _env():
    """The Jinja2 environment of the report templates (autoescaped for HTML only)."""
    import jinja2
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    md = MarkdownIt("commonmark", {"html": False})
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dsc.validate", "templates"),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), default_for_string=False
        ),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["md"] = lambda text: Markup(md.renderInline(str(text)))
    env.filters["mdcell"] = md_cell
    env.filters["mdcode"] = _code
    return env


def _code(text) -> str:
    from dsc.validate._report_view import code

    return code(text)


# CommonMark punctuation that would turn a plain-text table cell into markup (a lone `_` between
# word characters does not, and escaping it would clutter module names in a terminal).
_MD_SPECIAL = re.compile(r"([\\`*\[\]<|]|(?<!\w)_|_(?!\w))")


def md_cell(text) -> str:
    """Plain text as one markdown table cell: markup characters and `|` escaped, one line."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split())) or " "


def render_markdown(rep: dict) -> str:
    """report.md from report.json's record `rep` (see `collect`); plain CommonMark + GFM tables."""
    from dsc.validate._report_view import build_view

    text = _env().get_template("report.md.j2").render(v=build_view(rep, draw=False))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def render_html(rep: dict) -> str:
    """report.html from report.json's record `rep`: one self-contained page (inline CSS and
    SVG plots drawn with matplotlib; no script, no external reference)."""
    from dsc.validate._report_view import build_view

    return _env().get_template("report.html.j2").render(v=build_view(rep, draw=True))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(artifact: str | Path) -> dict:
    """(Re)generate report.json, report.md and report.html in `artifact` from its files, and
    record their sha256 in its manifest (all of them or none: Ctrl-C is deferred). Returns
    report.json's record (`collect`). Raises `dsc.errors.BadInput` (exit 3) when `artifact` is
    not a readable dsc artifact."""
    artifact = Path(artifact)
    rep = collect(artifact)
    md = render_markdown(rep)
    page = render_html(rep)
    manifest = load_manifest(artifact)
    from dsc import signals
    from dsc.models.checkpoint import sha256_file

    with signals.deferred():  # the reports and the manifest's hashes of them, or none
        _write(artifact / "report.json", json.dumps(rep, indent=2) + "\n")
        _write(artifact / "report.md", md)
        _write(artifact / "report.html", page)
        for name in ("report.json", "report.md", "report.html"):
            manifest.setdefault("outputs", {})[name] = sha256_file(artifact / name)
        _write(artifact / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return rep
