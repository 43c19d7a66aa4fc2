"""The report's plots: matplotlib figures written as inline SVG strings.

Each function takes plain records from the artifact (validation.json, the manifest's profiles
and stages, bench.json, quant_report.json) and returns one `<svg>` element, or None when there
is nothing to draw. The figures use matplotlib's object API (`matplotlib.figure.Figure`, no
pyplot): nothing global is touched and no GUI backend is ever selected.

Every axes has a title and labelled x and y axes; their SVG groups carry the ids
`<plot>-title`, `<plot>-xlabel` and `<plot>-ylabel` (`<plot>-<n>-...` for the n-th axes of a
figure with several) so that a reader of the page, or a test, can find them. Text stays text
(`svg.fonttype: none`), and `svg.hashsalt` plus an empty `Date` make the SVG byte-for-byte
reproducible: re-running `dsc report` does not change report.html.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

GiB = 2**30
PASS_COLOR = "#2b8a3e"
FAIL_COLOR = "#c92a2a"
NEUTRAL_COLOR = "#495057"  # reference lines that are not pass/fail thresholds
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_RC = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
# The longest module name drawn as a tick label, and the most entries that each get one.
_MAX_NAMED_TICKS = 60


def _figure(width: float, height: float, *, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _label(ax, n: int, title: str, xlabel: str, ylabel: str) -> None:
    """Title and axis labels of the n-th axes, each with an SVG id a reader (or test) can find
    (`<plot>-ax<n>-title`, `-xlabel`, `-ylabel` once `_svg` prefixes the plot's name)."""
    ax.set_title(title, gid=f"ax{n}-title")
    ax.set_xlabel(xlabel, gid=f"ax{n}-xlabel")
    ax.set_ylabel(ylabel, gid=f"ax{n}-ylabel")


def _svg(fig, name: str) -> str:
    """The figure as one `<svg>` element (no XML prolog), reproducible byte for byte."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": f"dsc-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    start = text.index("<svg")
    svg = text[start:].strip()
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.DOTALL)
    # Sized by the page's CSS (width 100%, height from the viewBox), not in points.
    svg = re.sub(r'^<svg([^>]*?) width="[^"]*" height="[^"]*"', r"<svg\1", svg, count=1)
    # One page holds several figures: every id (matplotlib's `figure_1`, `axes_1`, ...) and
    # every reference to one gets the plot's name, so that ids stay unique in the page.
    svg = re.sub(r'\b(id="|href="#|url\(#)', rf"\g<1>{name}-", svg)
    return svg.replace("<svg", f'<svg class="plot" id="plot-{name}" role="img"', 1)


def _draw(name: str, build) -> str | None:
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = build()
        return None if fig is None else _svg(fig, name)


def _short(module: str) -> str:
    """`model.model.layers.3.mlp.experts` -> `layers.3.mlp.experts` (the HF wrapper prefix)."""
    for prefix in ("model.model.", "model."):
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


# --- accuracy ----------------------------------------------------------------------------------


def module_error(
    layers: Sequence[dict], first_divergence: dict | None, *, floor: float, precision: str
) -> str | None:
    """Relative error of every module output against the reference, in graph order (depth).

    `layers`: validation.json's `layers` (tensor, module, layer, rel_error); `floor`: the
    locator's divergence floor, drawn as the threshold; the first divergence is marked red.
    The y axis is symmetric-log so that exact outputs (error 0) are drawn at 0.
    """
    if not layers:
        return None

    def build():
        fig, (ax,) = _figure(9.0, 4.2)
        errs = [float(e["rel_error"]) for e in layers]
        finite = [e for e in errs if math.isfinite(e)]
        top = max(finite + [floor]) if finite else floor
        errs = [e if math.isfinite(e) else top * 10 for e in errs]
        xs = range(len(errs))
        ax.plot(
            xs, errs, color=COLORS[0], marker="o", markersize=3, linewidth=1, label="relative error"
        )
        positives = [e for e in errs if e > 0]
        # Linear below the smallest error drawn (or a decade under the threshold): an exact
        # output (0) sits on the axis, everything else on decades.
        lin = 10 ** math.floor(math.log10(min(min(positives) if positives else floor, floor)))
        top = 10 ** math.ceil(math.log10(max(errs + [floor]) * 1.5))
        ax.set_yscale("symlog", linthresh=lin, linscale=0.4)
        ax.set_ylim(0, top)
        ax.set_yticks(
            [0.0] + [10.0**k for k in range(round(math.log10(lin)), round(math.log10(top)) + 1)]
        )
        # Not a gate threshold (outputs above it are normal for a quantized model): grey,
        # not the red that marks a failure.
        ax.axhline(
            floor,
            color=NEUTRAL_COLOR,
            linestyle=":",
            linewidth=1.2,
            label=f"locator floor {floor:g}: the first divergence is the first output "
            f"above it whose error jumps (not a pass/fail threshold)",
        )
        fd = first_divergence or {}
        hit = next(
            (i for i, e in enumerate(layers) if fd and e["tensor"] == fd.get("tensor")), None
        )
        if hit is not None:
            ax.plot(
                [hit],
                [errs[hit]],
                marker="o",
                markersize=10,
                markerfacecolor="none",
                markeredgecolor=FAIL_COLOR,
                markeredgewidth=2,
                linestyle="none",
                label=f"first divergence: {_short(fd['module'])}",
            )
        names = [_short(e["module"]) for e in layers]
        if len(names) <= _MAX_NAMED_TICKS:
            ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
        else:
            # Too many to name: a tick where each decoder layer starts.
            starts = [
                i
                for i, e in enumerate(layers)
                if e.get("layer") is not None
                and (i == 0 or layers[i - 1].get("layer") != e["layer"])
            ]
            step = max(1, math.ceil(len(starts) / 30))
            ticks = starts[::step]
            ax.set_xticks(
                ticks, [f"layers.{layers[i]['layer']}" for i in ticks], rotation=90, fontsize=7
            )
        if hit is not None and len(names) <= _MAX_NAMED_TICKS:
            tick = ax.get_xticklabels()[hit]
            tick.set_color(FAIL_COLOR)
            tick.set_fontweight("bold")
        ax.grid(axis="x", alpha=0.15)
        ax.set_xlim(-0.5, len(errs) - 0.5)
        fig.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
        _label(
            ax,
            0,
            f"{precision} vs reference: relative error per module output",
            "module output, in graph order (input → logits)",
            "relative error (symlog)",
        )
        return fig

    return _draw("module-error", build)


# (metric in the record, threshold key, axis title, direction) for the gate-metrics figure
GATE_PANELS = (
    ("cosine_p01", "min_cosine", "logit cosine, 1st percentile", "min"),
    ("top1", "min_top1", "top-1 agreement", "min"),
    ("top5", "min_top5", "top-5 agreement", "min"),
    ("kl_mean", "max_kl", "KL divergence, mean", "max"),
)


def gate_metrics(validation: dict) -> str | None:
    """The gate's metrics against their thresholds: one panel per metric (prefill and decode
    bars, the threshold dashed; a bar that misses it is red), then perplexity delta and greedy
    match."""
    th = validation.get("thresholds") or {}
    if not th or "prefill" not in validation:
        return None

    def build():
        fig, axes = _figure(10.5, 2.8, ncols=len(GATE_PANELS) + 2)
        for n, (ax, (metric, key, title, better)) in enumerate(
            zip(axes, GATE_PANELS, strict=False)
        ):
            vals = [validation[ph].get(metric) for ph in ("prefill", "decode")]
            labels = [
                ph for ph, v in zip(("prefill", "decode"), vals, strict=False) if v is not None
            ]
            vals = [v for v in vals if v is not None]
            _bars(ax, labels, vals, th.get(key), better)
            _label(
                ax,
                n,
                title,
                "phase",
                {"cosine_p01": "cosine", "kl_mean": "nats"}.get(metric, "fraction of positions"),
            )
        p = validation.get("perplexity") or {}
        ax = axes[-2]
        _bars(
            ax,
            ["Δ ppl"],
            [p.get("delta", math.nan) * 100],
            th.get("max_ppl_delta", math.nan) * 100,
            "max",
            unit="%",
        )
        _label(ax, len(GATE_PANELS), "perplexity increase", "candidate vs reference", "percent")
        g = validation.get("greedy") or {}
        ax = axes[-1]
        _bars(ax, ["greedy"], [g.get("greedy_match", math.nan)], th.get("min_greedy_match"), "min")
        _label(ax, len(GATE_PANELS) + 1, "greedy match", "generation", "fraction of tokens")
        fig.suptitle(
            f"accuracy gate ({validation.get('precision')}): metrics vs thresholds (dashed)",
            gid="suptitle",
        )
        return fig

    return _draw("gate-metrics", build)


def _ticks_up_to(hi: float):
    """matplotlib's automatic tick locator, without the ticks above `hi`."""
    from matplotlib.ticker import AutoLocator

    class UpTo(AutoLocator):
        def tick_values(self, vmin, vmax):
            return [t for t in super().tick_values(vmin, vmax) if t <= hi + 1e-12]

    return UpTo()


def _bars(
    ax, labels: list[str], vals: list[float], threshold: float | None, better: str, unit: str = ""
) -> None:
    from dsc.validate.gate import _apart  # as many digits as tell a value from its threshold

    def ok(v):
        if threshold is None or not math.isfinite(v):
            return math.isfinite(v)
        return v >= threshold if better == "min" else v <= threshold

    colors = [PASS_COLOR if ok(v) else FAIL_COLOR for v in vals]
    shown = [v if math.isfinite(v) else 0.0 for v in vals]
    ax.bar(labels, shown, color=colors, width=0.6)
    for i, v in enumerate(vals):
        text = _apart(v, threshold) if threshold is not None and math.isfinite(v) else f"{v:.4g}"
        ax.annotate(
            text + unit,
            (i, shown[i]),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            color=colors[i],
        )
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="#333", linestyle="--", linewidth=1)
    if better == "min" and threshold is not None:
        # Zoom on the decision: the span from the lowest of threshold and values up to 1
        # (these metrics are fractions or cosines), with room below and for the labels above.
        lo = min([threshold] + shown)
        span = max(1.0 - lo, 1e-6)
        bottom, top = max(0.0, lo - span * 0.6), max(1.0, max(shown)) + span * 0.25
        ax.set_ylim(bottom, top)
        ax.ticklabel_format(axis="y", useOffset=False)
        # The headroom above 1 is for the value labels: no tick there (a fraction or a cosine
        # of 1.2 does not exist).
        ax.yaxis.set_major_locator(_ticks_up_to(1.0))
    else:
        hi = max([abs(v) for v in shown] + [threshold or 0.0])
        lo = min(shown + [0.0])
        ax.set_ylim(lo * 1.3, hi * 1.3 if hi > 0 else 1.0)
    ax.grid(axis="x", visible=False)


# --- profiles, stages ----------------------------------------------------------------------------

# Plan components in the order they are stacked.
MEMORY_PARTS = ("weights", "kv_cache", "activations", "workspace", "runtime", "os_reserved")


def memory(profiles: dict[str, dict]) -> str | None:
    """Planned memory per profile (weights, KV cache, activations, workspace, runtime, OS
    reserve), stacked in GiB, against the device's capacity (the end of each track)."""
    rows = [
        (name, p["plan"])
        for name, p in profiles.items()
        if (p.get("plan") or {}).get("memory_bytes")
    ]
    if not rows:
        return None

    def build():
        fig, (ax,) = _figure(9.0, 1.3 + 0.55 * len(rows))
        ys = list(range(len(rows)))
        cap_max = max(plan["capacity_bytes"] for _, plan in rows) / GiB
        ax.barh(
            ys,
            [plan["capacity_bytes"] / GiB for _, plan in rows],
            height=0.7,
            color="#f1f3f5",
            edgecolor="#868e96",
            linewidth=1,
            label="capacity",
        )
        left = [0.0] * len(rows)
        parts = [k for k in MEMORY_PARTS if any(plan["memory_bytes"].get(k, 0) for _, plan in rows)]
        parts += sorted({k for _, plan in rows for k in plan["memory_bytes"]} - set(MEMORY_PARTS))
        for n, part in enumerate(parts):
            widths = [plan["memory_bytes"].get(part, 0) / GiB for _, plan in rows]
            ax.barh(
                ys,
                widths,
                left=left,
                height=0.45,
                color=COLORS[n % len(COLORS)],
                label=part.replace("_", " "),
            )
            left = [a + b for a, b in zip(left, widths, strict=False)]
        for y, (_, plan) in zip(ys, rows, strict=False):
            total, cap = plan["total_bytes"] / GiB, plan["capacity_bytes"] / GiB
            ax.annotate(
                f"{total:,.2f} of {cap:,.0f} GiB ({total / cap:.0%})",
                (cap, y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_yticks(ys, [name for name, _ in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, cap_max * 1.25)
        fig.legend(loc="outside lower center", ncol=len(parts) + 1, fontsize=8, frameon=False)
        ax.grid(axis="y", visible=False)
        _label(ax, 0, "planned device memory at the engine envelope vs capacity", "GiB", "profile")
        return fig

    return _draw("memory", build)


def stage_times(rows: Sequence[tuple[str, float, str]]) -> str | None:
    """Seconds per stage (`rows`: name, seconds, status); reused stages are drawn hatched grey
    with the time they took when they ran."""
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return None

    def build():
        fig, (ax,) = _figure(9.0, 0.8 + 0.32 * len(rows))
        ys = list(range(len(rows)))
        colors = [COLORS[0] if status == "ran" else "#ced4da" for _, _, status in rows]
        bars = ax.barh(ys, [s for _, s, _ in rows], color=colors, height=0.6)
        for bar, (_, _, status) in zip(bars, rows, strict=False):
            if status != "ran":
                bar.set_hatch("//")
        for y, (_, s, status) in zip(ys, rows, strict=False):
            ax.annotate(
                f"{s:,.1f} s" + ("" if status == "ran" else f" ({status})"),
                (s, y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_yticks(ys, [name for name, _, _ in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, max(s for _, s, _ in rows) * 1.2 or 1.0)
        ax.grid(axis="y", visible=False)
        _label(ax, 0, "time per stage", "seconds", "stage")
        return fig

    return _draw("stages", build)


# --- quantization, latency -----------------------------------------------------------------------


def expert_tokens(experts: dict) -> str | None:
    """Calibration tokens routed to each MoE expert, per MoE layer, against the minimum below
    which an expert counts as under-calibrated."""
    counts = (experts or {}).get("token_counts") or {}
    if not counts:
        return None

    def build():
        fig, (ax,) = _figure(9.0, 3.0)
        width = 0.8 / len(counts)
        for n, (router, tokens) in enumerate(counts.items()):
            xs = [i + (n - (len(counts) - 1) / 2) * width for i in range(len(tokens))]
            ax.bar(
                xs,
                tokens,
                width=width,
                color=COLORS[n % len(COLORS)],
                label=_short(router).removesuffix(".mlp.gate"),
            )
        min_tokens = experts.get("min_tokens")
        if min_tokens:
            ax.axhline(
                min_tokens,
                color=FAIL_COLOR,
                linestyle="--",
                linewidth=1,
                label=f"minimum {min_tokens} tokens",
            )
        n_exp = max(len(t) for t in counts.values())
        ax.set_xticks(range(n_exp), [str(i) for i in range(n_exp)] if n_exp <= 64 else None)
        ax.set_yscale("log")
        # A bar on a log axis needs a fixed base to be read: one token (10^0).
        ax.set_ylim(bottom=1)
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
        ax.grid(axis="x", visible=False)
        _label(ax, 0, "calibration tokens per routed expert", "expert", "tokens (log scale)")
        return fig

    return _draw("experts", build)


def latency(bench: dict) -> str | None:
    """`dsc bench`: time per output token and time to first token against batch size, p50
    (solid) and p99 (dashed), one colour per prompt length."""
    rows = (bench or {}).get("rows") or []
    if not rows:
        return None

    def build():
        fig, axes = _figure(9.0, 3.2, ncols=2)
        lens = sorted({r["prompt_len"] for r in rows})
        for n, length in enumerate(lens):
            rs = sorted((r for r in rows if r["prompt_len"] == length), key=lambda r: r["batch"])
            b = [r["batch"] for r in rs]
            c = COLORS[n % len(COLORS)]
            for ax, key in zip(axes, ("tpot", "ttft"), strict=False):
                ax.plot(
                    b,
                    [r[key]["p50_ms"] for r in rs],
                    marker="o",
                    color=c,
                    label=f"prompt {length}, p50",
                )
                ax.plot(
                    b,
                    [r[key]["p99_ms"] for r in rs],
                    linestyle="--",
                    linewidth=1,
                    color=c,
                    label=f"prompt {length}, p99",
                )
        batches = sorted({r["batch"] for r in rows})
        for ax in axes:
            ax.set_xticks(batches)
            ax.set_ylim(bottom=0)
        # One legend for both panels, under them (inside an axes it can cover a line).
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=min(4, len(labels)),
            fontsize=8,
            frameon=False,
        )
        _label(axes[0], 0, "time per output token (TPOT)", "batch size", "ms")
        _label(axes[1], 1, "time to first token (TTFT)", "batch size", "ms")
        fig.suptitle(f"latency on {bench.get('backend', '?')}", gid="suptitle")
        return fig

    return _draw("latency", build)
