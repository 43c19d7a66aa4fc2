"""Build reports of an artifact: report.json (schema: dsc/schemas/report.schema.json),
report.md, and a self-contained report.html with inline SVG plots (no network, no JS):

- per-layer relative error of the validation's layer comparison (log scale), the first
  divergence marked;
- latency vs batch size (TPOT p50 and TTFT p50 per prompt length) from `bench.json`;
- accuracy by precision: perplexity delta and top-1 agreement of every validation record found
  in the artifact (`validation.json`, and `validation-*.json` for other precisions).

Everything is regenerated from the files in the artifact (`dsc report ARTIFACT`).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from dsc.artifacts import MANIFEST, load_manifest

REPORT_SCHEMA_VERSION = 1


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(artifact: Path) -> dict:
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
        "model": manifest.get("source", {}),
        "stages": manifest.get("stages", {}),
        "validations": validations,
        "bench": _load(artifact / "bench.json"),
        "passes": _load(artifact / "passes_report.json"),
        "quantization": _load(artifact / "quant_report.json"),
    }


# --- plots --------------------------------------------------------------------------------------

_W, _H, _PAD = 640, 260, 48


def _svg(body: str, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
            f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{html.escape(title)}">'
            f'<rect width="{_W}" height="{_H}" fill="white"/>'
            f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>'
            f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - 10}" y2="{_H - _PAD}" stroke="#333"/>'
            f'<line x1="{_PAD}" y1="30" x2="{_PAD}" y2="{_H - _PAD}" stroke="#333"/>{body}</svg>')


def layer_error_svg(validation: dict) -> str | None:
    layers = validation.get("layers") or []
    if not layers:
        return None
    vals = [max(min(e["rel_error"], 1e6), 1e-9) for e in layers]
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    hi = max(hi, lo + 1)
    first = (validation.get("first_divergence") or {}).get("tensor")
    n = len(vals)
    bw = (_W - _PAD - 20) / n
    body = []
    for i, (e, v) in enumerate(zip(layers, vals)):
        h = (math.log10(v) - lo) / (hi - lo) * (_H - _PAD - 40) + 2
        color = "#d62728" if e["tensor"] == first else "#1f77b4"
        x = _PAD + 5 + i * bw
        body.append(f'<rect x="{x:.1f}" y="{_H - _PAD - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="{color}"><title>{html.escape(e["module"])}: '
                    f'{e["rel_error"]:.3g}</title></rect>')
    body.append(f'<text x="{_PAD - 4}" y="36" text-anchor="end" font-size="10">1e{hi:.0f}</text>')
    body.append(f'<text x="{_PAD - 4}" y="{_H - _PAD}" text-anchor="end" font-size="10">1e{lo:.0f}</text>')
    body.append(f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle" font-size="11">module '
                f'outputs in graph order (red: first divergence)</text>')
    return _svg("".join(body), "relative error per module output (log scale)")


def latency_svg(bench: dict) -> str | None:
    rows = (bench or {}).get("rows") or []
    if not rows:
        return None
    batches = sorted({r["batch"] for r in rows})
    lens = sorted({r["prompt_len"] for r in rows})
    ymax = max(r["tpot"]["p50_ms"] for r in rows) * 1.15
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]

    def xy(b, ms):
        x = _PAD + 10 + (batches.index(b) / max(len(batches) - 1, 1)) * (_W - _PAD - 40)
        return x, _H - _PAD - ms / ymax * (_H - _PAD - 40)

    body = []
    for k, length in enumerate(lens):
        pts = [xy(r["batch"], r["tpot"]["p50_ms"]) for r in rows if r["prompt_len"] == length]
        c = colors[k % len(colors)]
        body.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
            c, " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
        body.append(f'<text x="{_W - 120}" y="{40 + 14 * k}" font-size="11" fill="{c}">prompt {length}</text>')
    for b in batches:
        x, _ = xy(b, 0)
        body.append(f'<text x="{x:.1f}" y="{_H - _PAD + 14}" text-anchor="middle" font-size="10">{b}</text>')
    body.append(f'<text x="{_PAD - 4}" y="36" text-anchor="end" font-size="10">{ymax:.1f} ms</text>')
    body.append(f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle" font-size="11">batch size</text>')
    return _svg("".join(body), f"time per output token, p50 ({bench.get('backend')})")


def accuracy_svg(validations: list[dict]) -> str | None:
    if not validations:
        return None
    n = len(validations)
    bw = (_W - _PAD - 40) / n / 2.5
    body = []
    deltas = [abs(v["perplexity"]["delta"]) for v in validations]
    dmax = max(max(deltas), max(v["thresholds"]["max_ppl_delta"] for v in validations), 1e-6)
    for i, v in enumerate(validations):
        x = _PAD + 20 + i * bw * 2.5
        h1 = min(abs(v["perplexity"]["delta"]) / dmax, 1) * (_H - _PAD - 50)
        h2 = v["prefill"]["top1"] * (_H - _PAD - 50)
        body.append(f'<rect x="{x:.1f}" y="{_H - _PAD - h1:.1f}" width="{bw:.1f}" height="{h1:.1f}" '
                    f'fill="#ff7f0e"><title>ppl delta {v["perplexity"]["delta"]:+.3%}</title></rect>')
        body.append(f'<rect x="{x + bw:.1f}" y="{_H - _PAD - h2:.1f}" width="{bw:.1f}" '
                    f'height="{h2:.1f}" fill="#2ca02c"><title>top-1 {v["prefill"]["top1"]:.3f}'
                    f'</title></rect>')
        mark = "pass" if v["passed"] else "FAIL"
        body.append(f'<text x="{x + bw:.1f}" y="{_H - _PAD + 14}" text-anchor="middle" '
                    f'font-size="11">{html.escape(v["precision"])} ({mark})</text>')
    body.append(f'<text x="{_W - 200}" y="40" font-size="11" fill="#ff7f0e">|ppl delta| (max '
                f'{dmax:.2%})</text><text x="{_W - 200}" y="54" font-size="11" fill="#2ca02c">'
                f'top-1 agreement (0..1)</text>')
    return _svg("".join(body), "accuracy by precision")


# --- documents ----------------------------------------------------------------------------------


def _md(rep: dict) -> str:
    src = rep["model"]
    lines = [f"# dsc report: {src.get('architecture', '?')} ({src.get('family', '?')})", "",
             f"artifact: `{rep['artifact']}`", ""]
    if rep["stages"]:
        lines += ["## Stages", "", "| stage | details |", "|---|---|"]
        for name, st in rep["stages"].items():
            detail = ", ".join(f"{k}={v}" for k, v in st.items()
                               if isinstance(v, (str, int, float, bool)))
            lines.append(f"| {name} | {detail} |")
        lines.append("")
    lines += _passes_md(rep.get("passes"))
    lines += _quant_md(rep.get("quantization"))
    for v in rep["validations"]:
        verdict = "PASS" if v["passed"] else "FAIL"
        lines += [f"## Validation ({v['precision']}): {verdict}", "",
                  f"reference: {v.get('reference')}; data: {v['data']['tokens']} tokens", "",
                  "| metric | prefill | decode | threshold |", "|---|---|---|---|"]
        th = v["thresholds"]
        for metric, key in (("cosine_p01", "min_cosine"), ("cosine_min", None), ("top1", "min_top1"),
                            ("top5", "min_top5"), ("kl_mean", "max_kl"), ("max_abs", None)):
            if metric not in v["prefill"]:
                continue  # a record written before the metric existed
            lines.append(f"| {metric} | {v['prefill'][metric]:.5g} | {v['decode'][metric]:.5g} | "
                         f"{th.get(key, '') if key else ''} |")
        p = v["perplexity"]
        lines += ["", f"perplexity: candidate {p['candidate']:.4f}, reference {p['reference']:.4f},"
                  f" delta {p['delta']:+.3%} (max {th['max_ppl_delta']:.2%})",
                  f"greedy: {v['greedy']['mean_tokens_until_divergence']:.1f} of "
                  f"{v['greedy']['gen_len']} tokens agree before the first divergence "
                  f"(match {v['greedy']['greedy_match']:.2f}, min {th['min_greedy_match']})", ""]
        if v["failures"]:
            lines += ["failures:", *[f"- {f}" for f in v["failures"]], ""]
        fd = v.get("first_divergence")
        if fd:
            lines += [f"first divergence: layer {fd['layer']}, `{fd['module']}` "
                      f"(tensor `{fd['tensor']}`, relative error {fd['rel_error']:.3g})", ""]
    b = rep["bench"]
    if b:
        lines += [f"## Latency ({b['backend']}, host bandwidth {b['host_bandwidth_gbps']:.1f} GB/s)",
                  "", "| batch | prompt | TTFT p50 ms | TPOT p50/p90/p99 ms | decode tok/s | "
                  "bandwidth GB/s | of host BW |", "|---|---|---|---|---|---|---|"]
        for r in b["rows"]:
            lines.append(f"| {r['batch']} | {r['prompt_len']} | {r['ttft']['p50_ms']:.2f} | "
                         f"{r['tpot']['p50_ms']:.2f}/{r['tpot']['p90_ms']:.2f}/"
                         f"{r['tpot']['p99_ms']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                         f"{r['bandwidth_gbps']:.2f} | {r['fraction_of_host_bandwidth']:.1%} |")
        if b.get("target"):
            t = b["target"]
            lines += ["", f"target {t['profile']} ({t['precision']}) decode ceilings: " + ", ".join(
                f"batch {r['batch']}: {r['decode_ceiling_tokens_per_s']:.0f} tok/s" for r in t["rows"]),
                f"({t['note']})"]
        lines.append("")
    return "\n".join(lines)


def _passes_md(passes: dict | None) -> list[str]:
    """Per pass: time, nodes before -> after, what it rewrote; then the coverage."""
    if not passes or "report" not in passes:
        return []
    r = passes["report"]
    lines = [f"## Graph passes ({passes.get('target', {}).get('name', '?')})", "",
             f"{r['nodes_before']} -> {r['nodes_after']} nodes in {r['seconds'] * 1e3:.0f} ms", "",
             "| pass | ms | nodes before | nodes after | rewrites |", "|---|---|---|---|---|"]
    for p in r["passes"]:
        counts = ", ".join(f"{k} {v}" for k, v in p.get("counts", {}).items()) or "-"
        lines.append(f"| {p['name']} | {p['seconds'] * 1e3:.1f} | {p['nodes_before']} | "
                     f"{p['nodes_after']} | {counts} |")
    cov = (passes.get("coverage") or {}).get("kinds", {})
    if cov:
        lines += ["", "| block | fused | of | forms | not fused (reason) |", "|---|---|---|---|---|"]
        for kind, e in cov.items():
            if not e.get("blocks"):
                continue
            forms = ", ".join(f"{k} x{v}" for k, v in (e.get("forms") or {}).items()) or "-"
            missed = "; ".join(f"{m.get('node', '?')}: {m.get('reason', '?')}"
                               for m in e.get("unfused", []) if isinstance(m, dict)) or "-"
            lines.append(f"| {kind} | {e['fused'] + e.get('kept', 0)} | {e['blocks']} | {forms} "
                         f"| {missed} |")
    lines.append("")
    return lines


def _quant_md(q: dict | None) -> list[str]:
    """Scheme, layers quantized / kept in float, MoE experts short of calibration tokens."""
    if not q or "layers" not in q:
        return []
    lines = [f"## Quantization ({q.get('scheme', '?')}, ranges by {q.get('method', '?')})", "",
             f"{len(q['layers'])} linear layers quantized; kept in float: "
             + (", ".join(f"{k} ({v})" for k, v in q.get("excluded", {}).items()) or "none")]
    skipped = q.get("skipped") or {}
    if skipped:
        lines.append("not quantized: " + ", ".join(f"{k} ({v})" for k, v in skipped.items()))
    ex = q.get("experts") or {}
    if ex.get("token_counts"):
        under = ex.get("under_calibrated") or []
        lines.append(f"MoE experts: {sum(len(v) for v in ex['token_counts'].values())} calibrated; "
                     f"{len(under)} saw fewer than {ex.get('min_tokens')} tokens"
                     + (": " + ", ".join(u["expert"] for u in under[:16]) if under else ""))
    lines.append("")
    return lines


def _html(rep: dict, md: str) -> str:
    plots = [s for s in (
        layer_error_svg(rep["validations"][0]) if rep["validations"] else None,
        latency_svg(rep["bench"]) if rep["bench"] else None,
        accuracy_svg(rep["validations"]),
    ) if s]
    body = []
    for line in md.splitlines():
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("|") and not line.startswith("|---"):
            cells = "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
            body.append(f"<tr>{cells}</tr>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    joined, out, in_table = body, [], False
    for item in joined:
        if item.startswith("<tr>") and not in_table:
            out.append("<table>")
            in_table = True
        if not item.startswith("<tr>") and in_table:
            out.append("</table>")
            in_table = False
        out.append(item)
    if in_table:
        out.append("</table>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}"
             "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px}"
             "svg{display:block;margin:1em 0;border:1px solid #eee}")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>dsc report</title>"
            f"<style>{style}</style></head><body>{''.join(plots)}{''.join(out)}</body></html>\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(artifact: str | Path) -> dict:
    """(Re)generate report.json, report.md and report.html in the artifact."""
    artifact = Path(artifact)
    rep = collect(artifact)
    md = _md(rep)
    manifest = load_manifest(artifact)
    from dsc import signals
    from dsc.models.checkpoint import sha256_file

    with signals.deferred():  # the reports and the manifest's hashes of them, or none
        _write(artifact / "report.json", json.dumps(rep, indent=2) + "\n")
        _write(artifact / "report.md", md)
        _write(artifact / "report.html", _html(rep, md))
        for name in ("report.json", "report.md", "report.html"):
            manifest.setdefault("outputs", {})[name] = sha256_file(artifact / name)
        _write(artifact / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return rep
