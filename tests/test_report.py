"""report.md and report.html (dsc/validate/report.py), on artifacts whose records are made here.

- report.md parses as CommonMark with tables: every table has its header row, no separator
  line is left as text;
- report.html, read by an HTML parser: the title comes before the first plot, the verdict with
  the failing metrics before any section, every table has a header row, no `|---` text, every
  plot has a title and labelled axes per axes, nothing refers outside the page, and hashes sit
  in a collapsed <details>;
- both are byte-for-byte reproducible, and `dsc report` rewrites them (exit 0) or refuses a
  directory that is no artifact (exit 3, one line);
- headless Chromium (Debian's `chromium`; skipped where it is absent) renders the page: the
  screenshot is not blank and the page ends at a sane height.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from .conftest import run_cli

GiB = 2**30
MODULES = (
    ["model.model.embed_tokens"]
    + [
        f"model.model.layers.{i}.{m}"
        for i in range(4)
        for m in (
            "self_attn.q_a_proj",
            "self_attn",
            "self_attn.o_proj",
            "mlp.gate",
            "mlp.experts",
            "mlp",
        )
    ]
    + ["model.model.norm", "model.lm_head"]
)
BROKEN = 13  # index of the module output where the synthetic error jumps


def _logits(cos: float) -> dict:
    return {
        "positions": 64,
        "cosine_mean": cos,
        "cosine_min": cos - 0.01,
        "cosine_p01": cos,
        "max_abs": 1.5,
        "kl_mean": 0.003,
        "kl_max": 0.1,
        "top1": 0.97,
        "top5": 1.0,
    }


def _profile(name: str, sm: int, *, built: bool) -> dict:
    plan = {
        "fits": True,
        "precision": "int8",
        "batch": 16,
        "context": 512,
        "input_len": 512,
        "total_bytes": int(3.02 * GiB),
        "capacity_bytes": 24 * GiB,
        "margin_bytes": int(20.98 * GiB),
        "memory_bytes": {
            "weights": 2_429_952,
            "kv_cache": 3_145_728,
            "activations": 16_908_288,
            "workspace": 2 * GiB,
            "runtime": GiB,
            "os_reserved": 0,
        },
        "decode": {"tokens_per_s": 1.2e6, "tokens_per_s_per_sequence": 7.5e4},
    }
    engine = {
        "path": f"engines/{name}/model.engine",
        "sha256": "e" * 64,
        "size_bytes": 55_698_228,
        "backend": "tensorrt_rtx",
        "trt_version": "1.7.1.116",
        "target_sm": sm,
        "build_seconds": 34.5,
        "num_layers": 2456,
        "memory_bytes": {"weights": 2_491_968, "activation": 19_565_056},
    }
    pre = {
        "sm": 89,
        "passed": True,
        "backend": "tensorrt_rtx",
        "trt_version": "1.7.1.116",
        "size_bytes": 50_000_000,
        "seconds": 20.0,
        "num_layers": 2400,
    }
    return {
        "status": "built" if built else "awaiting_device_build",
        "sm": sm,
        "mode": "rtx" if built else "preflight",
        "engine": engine if built else None,
        "preflight": None if built else pre,
        "device_command": None if built else f"engines/{name}/trtexec.sh",
        "profile": {
            "name": name,
            "description": f"GPU {name}, somewhere",
            "tensorrt": {"version": "11.4"},
        },
        "envelope": {"max_batch": 16, "max_input_len": 512, "max_kv": 512},
        "plan": plan,
    }


def make_artifact(root: Path, *, passed: bool) -> Path:
    """An artifact directory holding every record the report reads (no graph, no engine)."""
    root.mkdir(parents=True)
    thresholds = {
        "min_cosine": 0.97,
        "min_top1": 0.8,
        "min_top5": 0.93,
        "max_kl": 0.08,
        "max_ppl_delta": 0.02,
        "min_greedy_match": 0.2,
    }
    cos = 0.996 if passed else 0.95
    layers = [
        {
            "tensor": f"t{i}",
            "module": m,
            "layer": None if "layers." not in m else int(m.split("layers.")[1].split(".")[0]),
            "rel_error": 0.0 if i == 0 else (0.004 if i < BROKEN else 0.2),
        }
        for i, m in enumerate(MODULES)
    ]
    failures = (
        [] if passed else [f"prefill cosine_p01 {cos} < 0.97", f"decode cosine_p01 {cos} < 0.97"]
    )
    validation = {
        "kind": "gate",
        "precision": "int8",
        "thresholds": thresholds,
        "data": {"windows": 8, "window": 128, "tokens": 1024},
        "prefill": _logits(cos),
        "decode": _logits(cos),
        "perplexity": {"candidate": 26.5, "reference": 26.45, "delta": 0.0021},
        "greedy": {
            "prompts": 8,
            "gen_len": 32,
            "tokens_until_divergence": [32] * 8,
            "mean_tokens_until_divergence": 32.0,
            "greedy_match": 1.0,
        },
        "failures": failures,
        "passed": passed,
        "layers": layers,
        "first_divergence": None if passed else layers[BROKEN],
        "candidate": "model.onnx",
        "reference": "reference/ (fp16 graph)",
    }
    summary = {k: validation[k] for k in ("kind", "precision", "passed", "failures")}
    summary |= {"perplexity_delta": 0.0021, "top1_prefill": 0.97}
    stage = {
        "status": "ran",
        "input_hash": "a" * 64,
        "seconds": 10.0,
        "peak_rss_bytes": 500 * 2**20,
        "outputs": {"x.json": "b" * 64},
    }
    manifest = {
        "format": "dsc-artifact",
        "schema_version": 1,
        "created": "2026-11-30T08:29:30Z",
        "command": "build",
        "tools": {"dsc": "0.1.0"},
        "precision": "int8",
        "graph": {"onnx": "model.onnx", "dtype": "fp16"},
        "source": {
            "checkpoint": "/ckpt/tiny | v3",
            "architecture": "DeepseekV3ForCausalLM",
            "family": "deepseek_v3",
            "num_parameters": 1_876_504,
            "inputs": {"model.safetensors": "c" * 64},
        },
        "stages": {
            "export": dict(stage, dtype="fp16", opset=20),
            "optimize": dict(stage, status="reused", nodes_before=672, nodes_after=638),
            "quantize": dict(stage, scheme="int8 W8A8", quantized_layers=48),
            "compile": {
                "status": "ran",
                "profiles": {"rtx-4090": dict(stage), "h100-sxm": dict(stage)},
            },
            "validate": dict(stage, result=summary),
        },
        "profiles": {
            "rtx-4090": _profile("rtx-4090", 89, built=True),
            "h100-sxm": _profile("h100-sxm", 90, built=False),
        },
        "validation": summary,
        "outputs": {"validation.json": "d" * 64},
    }
    passes = {
        "target": {"name": "TensorRT-RTX 1.7"},
        "report": {
            "nodes_before": 672,
            "nodes_after": 638,
            "seconds": 1.2,
            "passes": [
                {
                    "name": "fuse-rmsnorm",
                    "seconds": 0.03,
                    "nodes_before": 640,
                    "nodes_after": 504,
                    "counts": {"RmsNorm": 17},
                },
                {
                    "name": "cse",
                    "seconds": 0.005,
                    "nodes_before": 504,
                    "nodes_after": 504,
                    "counts": {},
                },
            ],
        },
        "coverage": {
            "kinds": {
                "rmsnorm": {
                    "blocks": 17,
                    "fused": 17,
                    "kept": 0,
                    "forms": {"RMSNorm": 17},
                    "unfused": [],
                },
                "moe": {
                    "blocks": 3,
                    "fused": 2,
                    "kept": 0,
                    "forms": {"a | b": 2},
                    "unfused": [{"node": "n1", "reason": "shape <unknown>"}],
                },
            }
        },
    }
    quant = {
        "scheme": "int8 W8A8",
        "method": "max",
        "layers": {f"l{i}": {"kind": "linear"} for i in range(30)},
        "excluded": {"model.lm_head": "excluded by *lm_head*"},
        "skipped": {},
        "weight_only": {"l1": "decode-only branch"},
        "experts": {
            "token_counts": {"model.model.layers.1.mlp.gate": [2000, 3, 1900, 40]},
            "min_tokens": 16,
            "under_calibrated": [{"expert": "layers.1.experts.1", "tokens": 3}],
        },
    }
    pct = {"p50_ms": 1.2, "p90_ms": 1.5, "p99_ms": 2.0}
    bench = {
        "backend": "onnxruntime-cpu",
        "host_bandwidth_gbps": 33.1,
        "rows": [
            {
                "batch": b,
                "prompt_len": p,
                "ttft": pct,
                "tpot": pct,
                "decode_tokens_per_s": b / 1.2e-3,
                "bandwidth_gbps": 3.2,
                "fraction_of_host_bandwidth": 0.1,
            }
            for b in (1, 2)
            for p in (16, 32)
        ],
    }
    for name, data in (
        ("manifest.json", manifest),
        ("validation.json", validation),
        ("passes_report.json", passes),
        ("quant_report.json", quant),
        ("bench.json", bench),
    ):
        (root / name).write_text(json.dumps(data, indent=1))
    return root


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """Two artifacts (gate passed, gate failed) with their reports written."""
    from dsc.validate.report import write_reports

    root = tmp_path_factory.mktemp("reports")
    out = {}
    for name, passed in (("pass", True), ("fail", False)):
        art = make_artifact(root / name, passed=passed)
        write_reports(art)
        out[name] = art
    return out


# --- report.md ---------------------------------------------------------------------------------


def test_markdown_is_commonmark_with_real_tables(reports):
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table")
    for name, art in reports.items():
        text = (art / "report.md").read_text()
        tokens = md.parse(text)
        tables = [i for i, t in enumerate(tokens) if t.type == "table_open"]
        # overview, profiles, gate, memory (2), stages, passes (2), quantization, latency
        assert len(tables) == 10, name
        for i in tables:
            assert tokens[i + 1].type == "thead_open" and tokens[i + 3].type == "th_open"
        inline = "".join(
            t.content for t in tokens if t.type == "inline" and not _inside_table(tokens, t)
        )
        assert "|---" not in inline and "| " not in inline, name
        headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
        assert headings[0].startswith("dsc report: DeepseekV3ForCausalLM")
        assert f"Validation (int8): {name.upper()}" in headings
        # a cell holding `|`, `*` or `<` stays one cell, its text intact
        page = md.render(text)
        assert "a | b ×2" in page and "excluded by *lm_head*" in page
        assert "shape &lt;unknown&gt;" in page
    fail = (reports["fail"] / "report.md").read_text()
    assert "**FAIL: accuracy gate (int8) failed on 2 metrics" in fail
    assert f"first divergence: layer 2, `{MODULES[BROKEN]}`" in fail


def _inside_table(tokens, tok) -> bool:
    depth = 0
    for t in tokens:
        if t is tok:
            return depth > 0
        depth += t.type == "table_open"
        depth -= t.type == "table_close"
    return False


# --- report.html -------------------------------------------------------------------------------


class _Page(HTMLParser):
    """What the tests look at: the order of landmarks, tables, plots and their labels."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.order: list[str] = []  # "h1", "verdict", "svg", "section", ...
        self.tables: list[dict] = []
        self.plots: list[dict] = []
        self.text: list[str] = []
        self.refs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self.details_open: bool | None = None
        self._stack: list[tuple[str, dict]] = []
        self._svg_depth = 0
        self._details = 0
        self.in_details: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for k in ("src", "href", "xlink:href", "action"):
            if k in a:
                self.refs.append((tag, k, a[k]))
        if tag == "details":
            self._details += 1
            self.details_open = "open" in a
        if tag in ("h1", "h2", "section", "table") or "verdict" in (a.get("class") or ""):
            self.order.append("verdict" if "verdict" in (a.get("class") or "") else tag)
        if tag == "table":
            self.tables.append({"header": [], "rows": 0, "first_row_th": None})
        if self.tables and tag == "tr":
            self.tables[-1]["rows"] += 1
        if self.tables and tag in ("th", "td") and self.tables[-1]["first_row_th"] is None:
            self.tables[-1]["first_row_th"] = tag == "th"
        if tag == "svg":
            self._svg_depth += 1
            if self._svg_depth == 1:
                self.order.append("svg")
                self.plots.append({"id": a.get("id"), "axes": set(), "labels": {}})
        if self._svg_depth and tag == "g" and a.get("id"):
            gid = a["id"]
            plot = self.plots[-1]
            if gid.rsplit("-", 1)[-1].startswith("axes_"):
                plot["axes"].add(gid)
            for kind in ("title", "xlabel", "ylabel"):
                if gid.endswith(f"-{kind}"):
                    plot["labels"][gid] = ""
        self._stack.append((tag, a))

    def handle_endtag(self, tag):
        while self._stack:
            t, _ = self._stack.pop()
            if t == tag:
                break
        if tag == "svg":
            self._svg_depth -= 1
        if tag == "details":
            self._details -= 1

    def handle_data(self, data):
        if self._details:
            self.in_details.append(data)
        if self._svg_depth:
            for _, a in reversed(self._stack):
                gid = a.get("id", "")
                if gid in self.plots[-1]["labels"]:
                    self.plots[-1]["labels"][gid] += data
                    break
        else:
            self.text.append(data)
        if self._stack and self._stack[-1][0] == "th" and self.tables:
            self.tables[-1]["header"].append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_html_structure_plots_and_tables(reports):
    for art in reports.values():
        page = _parse(art / "report.html")
        order = page.order
        # the title, then the verdict, before any plot or section
        assert order[0] == "h1" and order[1] == "verdict", order[:5]
        assert order.index("h1") < order.index("svg") and order.index("verdict") < order.index(
            "section"
        )
        # every table has a header row: its first cell is a <th>, and no markdown leaks through
        assert len(page.tables) >= 10
        for t in page.tables:
            assert t["first_row_th"] is True and t["header"] and t["rows"] >= 2, t
        text = "".join(page.text)
        assert "|---" not in text and "**" not in text
        # every plot: each axes has a non-empty title, x label and y label
        ids = {p["id"] for p in page.plots}
        assert {
            "plot-gate-metrics",
            "plot-module-error",
            "plot-memory",
            "plot-stages",
            "plot-experts",
            "plot-latency",
        } <= ids, ids
        for p in page.plots:
            n = len(p["axes"])
            assert n >= 1, p["id"]
            for kind in ("title", "xlabel", "ylabel"):
                found = [g for g, s in p["labels"].items() if g.endswith(kind) and s.strip()]
                assert len(found) >= n, (p["id"], kind, p["labels"])
        # self-contained: no script, no stylesheet link, no image file, only in-page references
        assert not page.tags & {"script", "link", "img", "iframe", "object"}
        assert all(v.startswith("#") for _, _, v in page.refs), page.refs
        # hashes and raw records: collapsed
        assert page.details_open is False and "a" * 64 in "".join(page.in_details)
    fail = _parse(reports["fail"] / "report.html")
    text = "".join(fail.text)
    assert "FAIL: accuracy gate (int8) failed on 2 metrics" in text
    assert "prefill cosine_p01 0.95 < 0.97" in text
    # the first divergence is named on the error plot
    err = next(p for p in fail.plots if p["id"] == "plot-module-error")
    assert (
        MODULES[BROKEN].removeprefix("model.model.")
        in (reports["fail"] / "report.html").read_text()
    )
    assert err["axes"]
    # the profile rows: a final engine and a preflight, with their TensorRT and decode ceiling
    assert "final engine" in text and "preflight for SM89 passed" in text
    assert "TensorRT 11.4 on the device" in text and "1,200,000 tok/s at batch 16" in text
    # a rejected artifact's engine is marked as such; the engine file and its runtime are named
    assert "final engine (REJECTED: validation failed)" in text
    assert "REJECTED" not in "".join(_parse(reports["pass"] / "report.html").text)
    assert "engines/rtx-4090/model.engine" in text and "— (preflight only)" in text
    assert "needs the TensorRT-RTX runtime, not the profile's TensorRT 11.4" in text


def test_reports_are_reproducible_and_dsc_report_rewrites_them(reports, tmp_path, capsys):
    art = reports["fail"]
    before = {n: (art / n).read_bytes() for n in ("report.md", "report.html", "report.json")}
    (art / "report.html").unlink()
    code, _, err = run_cli(["report", str(art)], capsys)
    assert code == 0, err
    after = {n: (art / n).read_bytes() for n in before}
    assert after == before
    code, _, err = run_cli(["report", str(tmp_path)], capsys)
    assert code == 3 and err.count("\n") == 1 and "not a dsc artifact" in err


def test_an_artifact_with_few_records_still_reports(tmp_path):
    """An export-only artifact: no stages, profiles, validation or bench."""
    from dsc.validate.report import write_reports

    art = tmp_path / "bare"
    art.mkdir()
    (art / "manifest.json").write_text(
        json.dumps(
            {
                "format": "dsc-artifact",
                "schema_version": 1,
                "source": {"architecture": "Qwen2ForCausalLM", "family": "qwen2"},
            }
        )
    )
    write_reports(art)
    page = _parse(art / "report.html")
    assert page.order[:2] == ["h1", "verdict"] and not page.plots
    assert "NOT VALIDATED" in "".join(page.text)


# --- a real browser ----------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in (os.environ.get("DSC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


WINDOW = (1200, 8000)


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless Chromium not installed (Debian: apt-get install chromium; "
    "scripts/setup_env.sh does it where apt-get can)",
)
@pytest.mark.parametrize("name", ["pass", "fail"])
def test_report_renders_in_headless_chromium(reports, tmp_path, name):
    from PIL import Image

    shot = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--screenshot={shot}",
            (reports[name] / "report.html").as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == WINDOW
    # Not blank: plenty of non-white pixels, and colour (the plots, the verdict banner).
    gray = img.convert("L")
    dark = sum(gray.histogram()[:200])
    assert dark > 0.01 * WINDOW[0] * WINDOW[1], dark
    assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50
    # A sane height: the content ends inside the tall window (the page is not endless), and
    # is longer than one screen (the sections are there, not collapsed into nothing).
    bbox = Image.eval(gray, lambda v: 255 - v).point(lambda v: 255 if v > 8 else 0).getbbox()
    assert bbox is not None
    height = bbox[3]
    assert 1500 < height < WINDOW[1] - 200, height
    # The verdict banner (green or red) is in the first screen, above everything else.
    top = img.crop((0, 0, WINDOW[0], 400))
    want = (235, 251, 238) if name == "pass" else (255, 245, 245)
    assert any(c == want for _, c in top.getcolors(maxcolors=1 << 16)), name
