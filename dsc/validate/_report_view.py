"""What the report says, independent of how it is written: `build_view(rep)` turns report.json's
record into a `ReportView` (a summary, then sections of text, tables and plots, then the raw
details) that the Jinja2 templates render as report.md and report.html.

Text here is CommonMark inline markup (`code` spans only); tables are lists of plain-text
cells (the templates escape them for their format). Plots are SVG strings, made only when
`draw=True` (report.md has none, so it does not import matplotlib).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from dsc.validate import _report_plots as plots
from dsc.validate.gate import _apart  # a value with the digits that tell it from its threshold
from dsc.validate.locate import DIVERGENCE_FLOOR

GiB = 2**30
MiB = 2**20
STAGE_ORDER = ("export", "optimize", "quantize", "compile", "validate")
# Gate table rows: (metric in the record, threshold key, direction).
GATE_ROWS = (
    ("cosine_p01", "min_cosine", "min"),
    ("cosine_min", None, None),
    ("top1", "min_top1", "min"),
    ("top5", "min_top5", "min"),
    ("kl_mean", "max_kl", "max"),
    ("max_abs", None, None),
)


@dataclass
class Table:
    """A table with a header row; cells are plain text. `align`: one letter per column, `l` or
    `r`; `flags`: per row, "fail" to mark it (red in HTML; its text says FAIL where it
    matters)."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    align: str = ""
    flags: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.align = (self.align or "l" * len(self.header)).ljust(len(self.header), "l")
        self.flags = self.flags or [""] * len(self.rows)


@dataclass
class Section:
    """One `##` section: paragraphs (inline markdown), plots (SVG), tables, in that order."""

    id: str
    title: str
    text: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # after the tables
    pre: list[str] = field(default_factory=list)  # preformatted blocks (raw JSON), last


@dataclass
class Verdict:
    """`state`: pass | fail | unknown; `headline` one line; `failures` the gate's list."""

    state: str
    headline: str
    failures: list[str] = field(default_factory=list)


@dataclass
class ReportView:
    title: str
    artifact: str
    verdict: Verdict
    overview: Table
    profiles: Table | None
    sections: list[Section]
    details: list[Section]  # hashes and raw records (collapsed in HTML, left out of markdown)


# --- formatting ----------------------------------------------------------------------------------


def code(text) -> str:
    """`text` as a CommonMark code span, whatever backticks it holds."""
    text = str(text)
    run = longest = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _num(v, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _gib(n) -> str:
    return "—" if n is None else f"{n / GiB:,.2f}"


def _size(n) -> str:
    if n is None:
        return "—"
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / MiB:,.1f} MiB"


def _secs(s) -> str:
    if s is None:
        return "—"
    if s >= 120:
        return f"{s / 60:,.1f} min"
    return f"{s:,.1f} s"


def _params(n) -> str:
    if not n:
        return "—"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return str(n)


# --- the summary -------------------------------------------------------------------------------


def verdict(rep: dict) -> Verdict:
    """The release decision: the manifest's validation record (the build's validate stage, or
    the latest `dsc validate`)."""
    v = rep.get("validation") or {}
    if not v:
        gates = [g for g in rep.get("validations") or [] if g.get("kind") == "gate"]
        v = gates[0] if gates else {}
    kind = v.get("kind")
    if kind == "gate":
        prec = v.get("precision", "?")
        if v.get("passed"):
            extra = []
            if v.get("perplexity_delta") is not None:
                extra.append(f"perplexity {v['perplexity_delta']:+.2%}")
            if v.get("top1_prefill") is not None:
                extra.append(f"top-1 {v['top1_prefill']:.3f}")
            return Verdict(
                "pass",
                f"PASS: accuracy gate ({prec}) passed"
                + (f" ({', '.join(extra)})" if extra else ""),
            )
        fails = list(v.get("failures") or [])
        head = (
            f"FAIL: accuracy gate ({prec}) failed on {len(fails)} "
            f"metric{'s' if len(fails) != 1 else ''}"
        )
        built = ((rep.get("stages") or {}).get("validate") or {}).get("result") or {}
        if built.get("kind") == "gate" and built.get("passed") is False:
            head += " (the build rejected this artifact and left its output as it was)"
        return Verdict("fail", head, fails)
    if kind == "smoke":
        if v.get("status") == "skipped":
            return Verdict("unknown", f"NOT VALIDATED: smoke check skipped ({v.get('reason')})")
        if v.get("passed"):
            # amber, not green: the graph runs, but nothing measured its accuracy
            return Verdict(
                "unknown",
                "PASS (smoke check only): finite logits, greedy decode and "
                "KV cache agree; no accuracy gate was run "
                f"({code('dsc validate ' + rep.get('artifact', '.'))})",
            )
        return Verdict(
            "fail",
            "FAIL: smoke check failed",
            [str(v.get("reason") or v.get("error") or "see build.log")],
        )
    return Verdict("unknown", "NOT VALIDATED: no validation record (`dsc validate ARTIFACT`)")


def _stage_rows(stages: dict) -> list[tuple[str, float | None, str, dict]]:
    """(name, seconds, status, record) per stage, compile split per profile, in pipeline order."""
    rows = []
    names = [n for n in STAGE_ORDER if n in stages] + [n for n in stages if n not in STAGE_ORDER]
    for name in names:
        st = stages[name] or {}
        if name == "compile" and st.get("profiles"):
            for prof, rec in st["profiles"].items():
                rows.append((f"compile: {prof}", rec.get("seconds"), rec.get("status", "?"), rec))
        else:
            rows.append((name, st.get("seconds"), st.get("status", "?"), st))
    return rows


def build_seconds(stages: dict) -> tuple[float, int, int]:
    """(seconds of the stages that ran in the build that wrote the artifact, stages that ran,
    stages reused from an earlier build)."""
    ran = reused = 0
    total = 0.0
    for _, secs, status, _ in _stage_rows(stages):
        if status == "ran":
            ran += 1
            total += secs or 0.0
        elif status == "reused":
            reused += 1
    return total, ran, reused


def _overview(rep: dict) -> Table:
    src = rep.get("model") or {}
    total, _, reused = build_seconds(rep.get("stages") or {})
    when = (rep.get("created") or "—").replace("T", " ").replace("Z", " UTC")
    prec = rep.get("precision") or "—"
    graph = (rep.get("graph") or {}).get("dtype")
    if graph and graph != prec:
        prec = f"{prec} (graph {graph})"
    build = _secs(total) + (
        f" ({reused} stage{'s' if reused != 1 else ''} reused)" if reused else ""
    )
    return Table(
        ["model", "family", "parameters", "precision", "total build time", "built", "dsc"],
        [
            [
                src.get("architecture", "?"),
                src.get("family", "?"),
                _params(src.get("num_parameters")),
                prec,
                build,
                when,
                (rep.get("tools") or {}).get("dsc", "—"),
            ]
        ],
    )


def _trt(p: dict) -> str:
    eng, pre = p.get("engine"), p.get("preflight")
    device = ((p.get("profile") or {}).get("tensorrt") or {}).get("version")
    if eng:
        if eng.get("backend") == "tensorrt_rtx":
            # a TensorRT-RTX plan does not load in standard TensorRT: say what the device needs
            return f"TensorRT-RTX {eng.get('trt_version', '?')} (needs the TensorRT-RTX runtime" + (
                f", not the profile's TensorRT {device})" if device else ")"
            )
        return f"TensorRT {eng.get('trt_version', '?')}"
    if pre:
        return (
            f"TensorRT {device or '?'} on the device (preflight: TensorRT-RTX "
            f"{pre.get('trt_version', '?')})"
        )
    return f"TensorRT {device or '?'}"


def _profiles(profiles: dict, rejected: bool = False) -> Table | None:
    """One row per hardware profile; `rejected`: the artifact failed its validation, so its
    engines are marked as not to ship."""
    if not profiles:
        return None
    rows, flags = [], []
    for name, p in profiles.items():
        eng, pre, plan = p.get("engine"), p.get("preflight"), p.get("plan") or {}
        if eng:
            status = "final engine" + (" (REJECTED: validation failed)" if rejected else "")
        elif pre:
            cut = pre.get("graph") or {}
            on = (
                f" on decoder layers {', '.join(map(str, cut.get('layers', [])))} of "
                f"{cut.get('of_layers')}"
                if cut.get("graph") == "layers"
                else ""
            )
            status = (
                f"preflight for SM{pre.get('sm')} passed{on}; build on the device "
                f"({p.get('device_command') or 'dsc compile'})"
            )
        else:
            status = p.get("status", "?")
        fit = "—"
        if plan.get("total_bytes") is not None:
            fit = (
                f"{'fits' if plan.get('fits') else 'DOES NOT FIT'}: "
                f"{_gib(plan['total_bytes'])} of {_gib(plan.get('capacity_bytes'))} GiB"
            )
        dec = (plan.get("decode") or {}).get("tokens_per_s")
        ceiling = f"{dec:,.0f} tok/s at batch {plan.get('batch')}" if dec else "—"
        desc = ((p.get("profile") or {}).get("description") or "").split(",")[0]
        rows.append(
            [
                name,
                desc or "—",
                f"SM{p.get('sm', '?')}",
                status,
                _size(eng.get("size_bytes")) if eng else "—",
                _trt(p),
                fit,
                ceiling,
            ]
        )
        flags.append("" if plan.get("fits", True) and not (eng and rejected) else "fail")
    return Table(
        [
            "profile",
            "GPU",
            "SM",
            "engine",
            "engine size",
            "TensorRT",
            "memory plan",
            "decode ceiling",
        ],
        rows,
        align="llllrlll",
        flags=flags,
    )


# --- sections ----------------------------------------------------------------------------------


def _gate_section(v: dict, draw: bool, floor: float) -> Section:
    verdict_word = "PASS" if v.get("passed") else "FAIL"
    s = Section(
        f"validation-{v.get('precision')}", f"Validation ({v.get('precision')}): {verdict_word}"
    )
    data = v.get("data") or {}
    s.text.append(
        f"candidate {code(v.get('candidate', 'model.onnx'))} against reference "
        f"{code(v.get('reference'))}, on {data.get('tokens', '?')} held-out tokens "
        f"({data.get('windows', '?')} windows of {data.get('window', '?')})"
        + (f"; record {code(v['file'])}" if v.get("file") else "")
    )
    if v.get("failures"):
        s.text.append("failing metrics: " + "; ".join(code(f) for f in v["failures"]))
    th = v.get("thresholds") or {}
    rows, flags = [], []
    for metric, key, better in GATE_ROWS:
        if metric not in (v.get("prefill") or {}):
            continue  # a record written before the metric existed
        pre, dec = v["prefill"].get(metric), (v.get("decode") or {}).get(metric)
        t = th.get(key) if key else None
        ok = True
        if t is not None:
            for x in (pre, dec):
                if x is not None and not (x >= t if better == "min" else x <= t):
                    ok = False
        rows.append(
            [
                metric,
                *(_num(x, ".5g") if t is None or x is None else _apart(x, t) for x in (pre, dec)),
                f"{'≥' if better == 'min' else '≤'} {t:g}" if t is not None else "—",
                "—" if t is None else ("pass" if ok else "FAIL"),
            ]
        )
        flags.append("" if ok else "fail")
    p, g = v.get("perplexity") or {}, v.get("greedy") or {}
    if p:
        t = th.get("max_ppl_delta")
        ok = t is None or p["delta"] <= t
        rows.append(
            [
                "perplexity delta",
                f"{p['delta']:+.3%}",
                "—",
                f"≤ {t:.2%}" if t is not None else "—",
                "pass" if ok else "FAIL",
            ]
        )
        flags.append("" if ok else "fail")
    if g:
        t = th.get("min_greedy_match")
        ok = t is None or g["greedy_match"] >= t
        rows.append(
            [
                "greedy match",
                f"{g['greedy_match']:.3f}",
                "—",
                f"≥ {t:g}" if t is not None else "—",
                "pass" if ok else "FAIL",
            ]
        )
        flags.append("" if ok else "fail")
    s.tables.append(
        Table(
            ["metric", "prefill", "decode", "threshold", "result"], rows, align="lrrrl", flags=flags
        )
    )
    if p:
        s.notes.append(
            f"perplexity: candidate {p['candidate']:.4f}, reference "
            f"{p['reference']:.4f}, delta {p['delta']:+.3%}"
        )
    if g:
        s.notes.append(
            f"greedy: {g.get('mean_tokens_until_divergence', 0):.1f} of "
            f"{g.get('gen_len')} tokens agree before the first divergence, over "
            f"{g.get('prompts')} prompts"
        )
    fd = v.get("first_divergence")
    if fd:
        s.notes.append(
            f"first divergence: layer {fd.get('layer')}, {code(fd['module'])} "
            f"(tensor {code(fd['tensor'])}, relative error {fd['rel_error']:.3g})"
        )
    elif v.get("layers"):
        s.notes.append(
            f"no first divergence: no module output's error jumps above "
            f"{floor:g} (the locator's threshold)"
        )
    if draw:
        s.plots += [
            x
            for x in (
                plots.gate_metrics(v),
                plots.module_error(
                    v.get("layers") or [], fd, floor=floor, precision=v.get("precision", "?")
                ),
            )
            if x
        ]
    return s


def _smoke_section(v: dict) -> Section:
    word = "SKIPPED" if v.get("status") == "skipped" else "PASS" if v.get("passed") else "FAIL"
    s = Section("validation-smoke", f"Validation (smoke check): {word}")
    if v.get("status") == "skipped":
        s.text.append(f"skipped: {v.get('reason')}")
        return s
    s.text.append(v.get("note") or "smoke check of the graph handed to the builder")
    rows = [
        ["backend", str(v.get("backend", "—"))],
        ["logits finite", "yes" if v.get("finite") else "no"],
        ["greedy tokens generated", str(len(v.get("generated_tokens") or []))],
        ["greedy agreement, cached vs uncached", _num(v.get("greedy_agreement"), ".3f")],
        ["KV cache vs prefill, relative difference", _num(v.get("kv_rel_diff"), ".2e")],
    ]
    if v.get("kv_checked_without_activation_qdq"):
        rows.append(
            [
                "KV cache vs prefill with activation Q/DQ (not checked)",
                _num(v.get("kv_rel_diff_exact_graph"), ".2e"),
            ]
        )
        s.notes.append(
            f"the KV-cache check ran with the graph's "
            f"{v['kv_checked_without_activation_qdq']} activation Q/DQ pairs removed: "
            "rounding to the neighbouring step on one path only moves a quantized "
            "graph's logits by more than float noise (see dsc.pipeline.smoke)"
        )
    s.tables.append(Table(["check", "result"], rows))
    if v.get("text"):
        s.notes.append(f"greedy text: {code(' '.join(v['text'].split()))}")
    return s


def _memory_section(profiles: dict, draw: bool) -> Section | None:
    rows = [
        (n, p) for n, p in (profiles or {}).items() if (p.get("plan") or {}).get("memory_bytes")
    ]
    if not rows:
        return None
    s = Section("memory", "Engines and memory")
    s.text.append(
        "The planner's device memory at each engine's envelope (largest batch, "
        "longest prompt, KV capacity), against the device's capacity."
    )
    parts = [
        k
        for k in plots.MEMORY_PARTS
        if any(p["plan"]["memory_bytes"].get(k) is not None for _, p in rows)
    ]
    table_rows, flags = [], []
    for name, p in rows:
        plan, env = p["plan"], p.get("envelope") or {}
        mem = plan["memory_bytes"]
        table_rows.append(
            [name]
            + [_size(mem.get(k)) for k in parts]
            + [
                _size(plan.get("total_bytes")),
                _size(plan.get("capacity_bytes")),
                _size(plan.get("margin_bytes")),
                (
                    f"{env.get('max_batch', '?')} × {env.get('max_input_len', '?')}"
                    f" / {env.get('max_kv', '?')}"
                ),
            ]
        )
        flags.append("" if plan.get("fits", True) else "fail")
    s.tables.append(
        Table(
            ["profile"]
            + [k.replace("_", " ") for k in parts]
            + ["total", "capacity", "margin", "envelope: batch × prompt / KV"],
            table_rows,
            align="l" + "r" * (len(parts) + 3) + "l",
            flags=flags,
        )
    )
    eng_rows = []
    for name, p in profiles.items():
        eng = p.get("engine") or {}
        pre = p.get("preflight") or {}
        em = eng.get("memory_bytes") or {}
        eng_rows.append(
            [
                name,
                eng.get("path") or ("— (preflight only)" if pre else "—"),
                p.get("mode", "—"),
                str(eng.get("num_layers") or pre.get("num_layers") or "—"),
                _size(eng.get("size_bytes") or pre.get("size_bytes")),
                _size(em.get("weights")) if em else "—",
                _size(em.get("activation")) if em else "—",
                _secs(eng.get("build_seconds") or pre.get("seconds")),
            ]
        )
    s.tables.append(
        Table(
            [
                "profile",
                "engine file",
                "mode",
                "layers",
                "engine (or preflight) size",
                "engine weights",
                "engine activations",
                "builder time",
            ],
            eng_rows,
            align="lllrrrrr",
        )
    )
    if draw:
        svg = plots.memory(dict(rows))
        if svg:
            s.plots.append(svg)
    return s


def _stages_section(stages: dict, profiles: dict, draw: bool) -> Section | None:
    rows = _stage_rows(stages or {})
    if not rows:
        return None
    total, ran, reused = build_seconds(stages)
    s = Section("stages", "Build stages")
    s.text.append(
        f"{ran} stage{'s' if ran != 1 else ''} ran in {_secs(total)}"
        + (
            f"; {reused} reused from an earlier build (their time is when they ran)"
            if reused
            else ""
        )
    )
    table = []
    for name, secs, status, rec in rows:
        note = rec.get("reason") or ""
        if name == "optimize" and rec.get("nodes_before") is not None:
            note = f"{rec['nodes_before']} → {rec.get('nodes_after')} nodes"
        elif name == "quantize" and rec.get("scheme"):
            note = f"{rec['scheme']}, {rec.get('quantized_layers', '?')} layers"
        elif name == "validate" and isinstance(rec.get("result"), dict):
            r = rec["result"]
            note = f"{r.get('kind')} {'passed' if r.get('passed') else 'FAILED'}"
        elif name.startswith("compile: "):
            p = (profiles or {}).get(name.removeprefix("compile: ")) or {}
            if p.get("engine"):
                note = f"engine {_size(p['engine'].get('size_bytes'))}"
            elif p.get("preflight"):
                note = f"preflight for SM{p['preflight'].get('sm')}; engine built on the device"
        elif name == "export" and rec.get("dtype"):
            note = f"{rec['dtype']}, opset {rec.get('opset', '?')}"
        rss = rec.get("peak_rss_bytes")
        table.append(
            [
                name,
                status,
                _secs(secs) if secs is not None else "—",
                _size(rss) if rss else "—",
                note or "—",
            ]
        )
    s.tables.append(Table(["stage", "status", "time", "peak RSS", "notes"], table, align="llrrl"))
    if draw:
        svg = plots.stage_times([(n, sec, st) for n, sec, st, _ in rows])
        if svg:
            s.plots.append(svg)
    return s


def _passes_section(passes: dict | None) -> Section | None:
    if not passes or "report" not in passes:
        return None
    r = passes["report"]
    s = Section("passes", f"Graph passes ({passes.get('target', {}).get('name', '?')})")
    s.text.append(f"{r['nodes_before']} → {r['nodes_after']} nodes in {r['seconds'] * 1e3:,.0f} ms")
    rows = []
    for p in r["passes"]:
        counts = ", ".join(f"{k} {v}" for k, v in (p.get("counts") or {}).items()) or "—"
        rows.append(
            [
                p["name"],
                f"{p['seconds'] * 1e3:,.1f}",
                str(p["nodes_before"]),
                str(p["nodes_after"]),
                counts,
            ]
        )
    s.tables.append(
        Table(["pass", "ms", "nodes before", "nodes after", "rewrites"], rows, align="lrrrl")
    )
    cov = (passes.get("coverage") or {}).get("kinds") or {}
    rows, flags = [], []
    for kind, e in cov.items():
        if not e.get("blocks"):
            continue
        done = e.get("fused", 0) + e.get("kept", 0)
        forms = ", ".join(f"{k} ×{v}" for k, v in (e.get("forms") or {}).items()) or "—"
        missed = (
            "; ".join(
                f"{m.get('node', '?')}: {m.get('reason', '?')}"
                for m in e.get("unfused") or []
                if isinstance(m, dict)
            )
            or "—"
        )
        rows.append([kind, str(done), str(e["blocks"]), f"{done / e['blocks']:.0%}", forms, missed])
        flags.append("" if done >= e["blocks"] else "fail")
    if rows:
        s.tables.append(
            Table(
                ["block", "fused", "of", "coverage", "forms", "not fused (reason)"],
                rows,
                align="lrrrll",
                flags=flags,
            )
        )
    return s


def _quant_section(q: dict | None, draw: bool) -> Section | None:
    if not q or "layers" not in q:
        return None
    scheme = q.get("scheme", "?")
    # weight-only schemes calibrate no activation ranges
    how = "" if "weight-only" in scheme else f", ranges by {q.get('method', '?')}"
    s = Section("quantization", f"Quantization ({scheme}{how})")
    kinds: dict[str, int] = {}
    for rec in q["layers"].values():
        kinds[rec.get("kind", "linear")] = kinds.get(rec.get("kind", "linear"), 0) + 1
    rows = [[f"quantized ({kind})", str(n), "—"] for kind, n in sorted(kinds.items())]
    wo = q.get("weight_only") or {}
    if wo:
        reasons = sorted(set(wo.values()))
        rows.append(["of which weight-only", str(len(wo)), "; ".join(reasons)])
    for label, d in (
        ("kept in float", q.get("excluded") or {}),
        ("not quantized", q.get("skipped") or {}),
    ):
        rows.append([label, str(len(d)), "; ".join(f"{k} ({v})" for k, v in d.items()) or "—"])
    ex = q.get("experts") or {}
    under = ex.get("under_calibrated") or []
    if ex.get("token_counts"):
        n = sum(len(v) for v in ex["token_counts"].values())
        rows.append(
            [
                f"MoE experts under {ex.get('min_tokens')} calibration tokens",
                f"{len(under)} of {n}",
                ", ".join(u.get("expert", "?") for u in under[:16])
                + (" …" if len(under) > 16 else "")
                or "—",
            ]
        )
    s.tables.append(
        Table(
            ["layers", "count", "which / why"],
            rows,
            align="lrl",
            flags=["fail" if r[0].startswith("MoE") and under else "" for r in rows],
        )
    )
    sq = q.get("smoothquant") or {}
    if sq.get("smoothed") is not None:
        s.notes.append(
            f"SmoothQuant (α {sq.get('alpha')}): {len(sq['smoothed'])} activations "
            f"smoothed, {len(sq.get('skipped') or {})} left as they were"
        )
    if draw and ex.get("token_counts"):
        svg = plots.expert_tokens(ex)
        if svg:
            s.plots.append(svg)
    return s


def _bench_section(b: dict | None, draw: bool) -> Section | None:
    if not b or not b.get("rows"):
        return None
    s = Section(
        "latency",
        f"Latency ({b.get('backend')}, host bandwidth {b.get('host_bandwidth_gbps', 0):.1f} GB/s)",
    )
    if str(b.get("backend", "")).startswith("onnxruntime"):
        s.text.append(
            f"timed with {code(b.get('backend'))} on the build host (the ONNX graph, "
            f"not the TensorRT engines): not the latency on the target GPU"
        )
    rows = []
    for r in b["rows"]:
        rows.append(
            [
                str(r["batch"]),
                str(r["prompt_len"]),
                *(f"{r['ttft'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                *(f"{r['tpot'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                f"{r['decode_tokens_per_s']:,.1f}",
                _num(r.get("bandwidth_gbps"), ".2f"),
                f"{r['fraction_of_host_bandwidth']:.1%}"
                if r.get("fraction_of_host_bandwidth") is not None
                else "—",
            ]
        )
    s.tables.append(
        Table(
            [
                "batch",
                "prompt",
                "TTFT p50 ms",
                "TTFT p90 ms",
                "TTFT p99 ms",
                "TPOT p50 ms",
                "TPOT p90 ms",
                "TPOT p99 ms",
                "decode tok/s",
                "bandwidth GB/s",
                "of host BW",
            ],
            rows,
            align="r" * 11,
        )
    )
    t = b.get("target")
    if t:
        # one per (batch, prompt): the KV cache read at the context differs
        s.notes.append(
            f"target {t['profile']} ({t['precision']}) decode ceilings: "
            + ", ".join(
                f"batch {r['batch']} prompt {r.get('prompt_len', '?')}: "
                f"{r['decode_ceiling_tokens_per_s']:,.0f} tok/s"
                for r in t["rows"]
            )
            + f" ({t.get('note')})"
        )
    if draw:
        svg = plots.latency(b)
        if svg:
            s.plots.append(svg)
    return s


def _details(rep: dict) -> list[Section]:
    out = []
    src = rep.get("model") or {}
    rows = [[f"input: {k}", v, "—"] for k, v in (src.get("inputs") or {}).items()]
    for name, _, status, rec in _stage_rows(rep.get("stages") or {}):
        if rec.get("input_hash"):
            rows.append([f"stage {name}", rec["input_hash"], status])
    s = Section("hashes", "Input hashes (sha256)")
    s.text.append(
        f"checkpoint {code(src.get('checkpoint', '?'))}; a stage's hash covers its "
        f"inputs, options and tool versions (a stage is reused when it is unchanged)"
    )
    s.tables.append(Table(["what", "sha256", "status"], rows))
    out.append(s)
    outputs = rep.get("outputs") or {}
    if outputs:
        s = Section("outputs", "Output files (sha256)")
        s.tables.append(Table(["file", "sha256"], [[k, v] for k, v in sorted(outputs.items())]))
        out.append(s)
    for v in rep.get("validations") or []:
        if v.get("layers"):
            s = Section(
                f"layers-{v.get('precision')}", f"Per-module relative error ({v.get('precision')})"
            )
            fd = (v.get("first_divergence") or {}).get("tensor")
            s.tables.append(
                Table(
                    ["#", "module", "tensor", "layer", "relative error"],
                    [
                        [
                            str(i),
                            e["module"],
                            e["tensor"],
                            "—" if e.get("layer") is None else str(e["layer"]),
                            f"{e['rel_error']:.3g}",
                        ]
                        for i, e in enumerate(v["layers"])
                    ],
                    align="rlllr",
                    flags=["fail" if e["tensor"] == fd else "" for e in v["layers"]],
                )
            )
            out.append(s)
    raw = Section("raw", "Raw records")
    raw.text.append("the manifest's stage, profile and validation records, as written")
    raw.pre.append(
        json.dumps(
            {
                "stages": rep.get("stages"),
                "profiles": rep.get("profiles"),
                "validation": rep.get("validation"),
            },
            indent=1,
            default=str,
        )
    )
    out.append(raw)
    return out


# --- entry point -------------------------------------------------------------------------------


def build_view(rep: dict, *, draw: bool = True, floor: float = DIVERGENCE_FLOOR) -> ReportView:
    """The report's content from report.json's record `rep`; `draw` makes the plots (SVG);
    `floor`: the locator's divergence threshold (relative error) drawn on the error plot."""
    src = rep.get("model") or {}
    title = (
        f"dsc report: {src.get('architecture', '?')} ({src.get('family', '?')}), "
        f"{rep.get('precision') or '?'}"
    )
    sections = []
    gates = [v for v in rep.get("validations") or [] if v.get("kind", "gate") == "gate"]
    for v in gates:
        sections.append(_gate_section(v, draw, floor))
    mv = rep.get("validation") or {}
    if mv.get("kind") == "smoke" and not gates:
        sections.append(_smoke_section(mv))
    sections += [
        s
        for s in (
            _memory_section(rep.get("profiles") or {}, draw),
            _stages_section(rep.get("stages") or {}, rep.get("profiles") or {}, draw),
            _passes_section(rep.get("passes")),
            _quant_section(rep.get("quantization"), draw),
            _bench_section(rep.get("bench"), draw),
        )
        if s
    ]

    sections += engine_bench_sections(rep.get("engine_benches") or [])
    return ReportView(
        title=title,
        artifact=rep.get("artifact", "?"),
        verdict=verdict(rep),
        overview=_overview(rep),
        profiles=_profiles(rep.get("profiles") or {}, rejected=verdict(rep).state == "fail"),
        sections=sections,
        details=_details(rep),
    )


# --- `dsc bench --engine` records (bench-engine-<profile>.json) ---


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def engine_bench_sections(benches: list[dict]) -> list[Section]:
    """One section per engine bench: a row per (CUDA graphs, batch, prompt length)."""
    out = []
    for b in benches:
        s = Section(
            f"engine-latency-{b.get('profile')}",
            f"Engine latency: {b.get('profile')} ({b.get('runtime')})",
        )
        if b.get("note"):
            s.text.append(str(b["note"]))
        rows = []
        for run in b.get("runs") or []:
            for r in run.get("rows") or []:
                rows.append(
                    [
                        "on" if run.get("cuda_graphs") else "off",
                        str(r["batch"]),
                        str(r["prompt_len"]),
                        *(f"{r['ttft'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                        *(f"{r['tpot'][k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms")),
                        f"{r['decode_tokens_per_s']:,.1f}",
                        "—"
                        if r.get("decode_ceiling_tokens_per_s") is None
                        else f"{r['decode_ceiling_tokens_per_s']:,.0f}",
                        _pct(r.get("fraction_of_roofline")),
                    ]
                )
        s.tables.append(
            Table(
                [
                    "CUDA graphs",
                    "batch",
                    "prompt",
                    "TTFT p50 ms",
                    "TTFT p90 ms",
                    "TTFT p99 ms",
                    "TPOT p50 ms",
                    "TPOT p90 ms",
                    "TPOT p99 ms",
                    "decode tok/s",
                    "roofline tok/s",
                    "of roofline",
                ],
                rows,
                align="l" + "r" * 11,
            )
        )
        s.notes.append(
            "roofline: dsc plan's decode ceiling for this profile's bandwidth, "
            "model, precision, batch and context (prompt + generated tokens)"
        )
        out.append(s)
    return out
