"""`dsc build` with graph passes and quantization (stages 2 and 3), and `dsc quantize` records.

Real runs on the qwen2 and deepseek_v3 fixtures: export, passes, calibration and Q/DQ, a
TensorRT-RTX engine compiled ahead of time, the smoke check; then the manifest, reuse, `dsc
verify` and the failure paths (illegal precision for the target, before any work).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dsc.backends.tensorrt import Flavour, available_backends
from dsc.manifest import schema_errors, verify_artifact

from .conftest import run_cli

needs_rtx = pytest.mark.skipif(
    Flavour.RTX not in available_backends(),
    reason="tensorrt_rtx is not installed (pip install 'dsc[rtx]')",
)


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _ops(path: Path) -> dict[str, int]:
    m = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}

    def walk(g):
        for n in g.node:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return counts


TINY_QWEN2 = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-qwen2"


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    """Trained tiny-qwen2 -> rtx-4090 engine, INT8 W8A8 SmoothQuant on the optimized graph,
    then the accuracy gate against the fp16 reference."""
    from dsc.cli import main

    out = tmp_path_factory.mktemp("bq") / "int8"
    argv = [
        "build",
        str(TINY_QWEN2),
        "--profile",
        "rtx-4090",
        "--int8",
        "--samples",
        "8",
        "--seq-len",
        "64",
        "-o",
        str(out),
        "--json",
        "-q",
    ]
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), e
    return out, argv


@needs_rtx
def test_int8_build_runs_every_stage_and_verifies(int8_build):
    art, _ = int8_build
    m = _manifest(art)
    assert not schema_errors(m)
    assert m["precision"] == "int8"
    st = m["stages"]
    for name in ("export", "optimize", "quantize", "validate"):
        assert st[name]["status"] == "ran", name
        assert st[name]["input_hash"] and st[name]["inputs"]
    assert st["compile"]["profiles"]["rtx-4090"]["status"] == "ran"
    # Each file belongs to the stage that wrote it last: the quantized graph to quantize, the
    # pass report to optimize, the tokenizer to export.
    q_out, o_out, e_out = (set(st[n]["outputs"]) for n in ("quantize", "optimize", "export"))
    assert {
        "model.onnx",
        "model_io.json",
        "quant_report.json",
        "reference/model.onnx",
        "calibration/ranges.json",
    } <= q_out
    assert o_out == {"passes_report.json"}
    assert "config.json" in e_out and "model.onnx" not in e_out
    assert not (q_out & o_out) and not (q_out & e_out)
    # The optimize record carries the coverage; qwen2 fuses everything.
    cov = st["optimize"]["coverage"]
    for kind in ("rmsnorm", "attention", "mlp"):
        assert cov[kind]["fused"] == cov[kind]["blocks"] > 0, kind
    # The graph handed to the builder is quantized and fused; the reference is fused fp16.
    ops = _ops(art / "model.onnx")
    assert ops.get("QuantizeLinear", 0) >= 4 and ops.get("DequantizeLinear", 0) >= 8
    assert ops.get("RMSNormalization", 0) > 0
    ref_ops = _ops(art / "reference" / "model.onnx")
    assert "QuantizeLinear" not in ref_ops and ref_ops.get("RMSNormalization", 0) > 0
    rep = json.loads((art / "quant_report.json").read_text())
    assert rep["scheme"] == "int8 W8A8" and len(rep["layers"]) == st["quantize"]["quantized_layers"]
    # SmoothQuant folds into the fused RMSNormalization scales.
    assert rep["smoothquant"]["smoothed"], rep["smoothquant"]["skipped"]
    assert json.loads((art / "model_io.json").read_text())["quantization"] == "int8"
    assert (art / "engines" / "rtx-4090" / "model.engine").stat().st_size > 0
    # The build report shows per-pass time and rewrites, the coverage and the quantization.
    md = (art / "report.md").read_text()
    assert "## Graph passes (TensorRT-RTX 1.7" in md and "| fuse-rmsnorm |" in md
    assert "| rmsnorm | " in md and "## Quantization (int8 W8A8, ranges by max)" in md
    assert "<h2>Graph passes" in (art / "report.html").read_text()
    # The validate stage of a quantized build is the accuracy gate, and it passed.
    v = m["validation"]
    assert v["kind"] == "gate" and v["passed"] is True and v["precision"] == "int8"
    assert abs(v["perplexity_delta"]) < 0.02 and v["top1_prefill"] > 0.9
    gate = json.loads((art / "validation.json").read_text())
    assert gate["reference"].startswith("reference/") and gate["prefill"]["cosine_p01"] > 0.97
    assert st["validate"]["outputs"] == {"validation.json": m["outputs"]["validation.json"]}
    assert "## Validation (int8): PASS" in md
    assert verify_artifact(art).ok


@needs_rtx
def test_failed_gate_keeps_the_rejected_artifact_beside_out(
    int8_build, tmp_path, monkeypatch, capsys
):
    from dsc.manifest import hash_tree
    from dsc.validate import gate

    art, argv = int8_build
    out = tmp_path / "out"
    shutil.copytree(art, out)  # an artifact that passed is at OUT and must stay as it was
    before = hash_tree(out)
    strict = {k: dict(v) for k, v in gate.DEFAULT_THRESHOLDS.items()}
    strict["int8"]["min_cosine"] = 0.99999
    monkeypatch.setattr(gate, "DEFAULT_THRESHOLDS", strict)
    code, _, err = run_cli(
        [
            "build",
            str(TINY_QWEN2),
            "--profile",
            "rtx-4090",
            "--int8",
            "--weight-only",
            "--samples",
            "4",
            "--seq-len",
            "32",
            "-o",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 1, err
    # the cosine is printed with the digits that tell it from the threshold, not rounded to 1
    m = re.search(r"accuracy gate \(int8\) failed: prefill cosine_p01 ([0-9.]+) < 0\.99999", err)
    assert m and float(m.group(1)) < 0.99999, err
    assert err.count("\n") == 1
    rejected = tmp_path / "out.rejected"
    assert f"the rejected artifact, with its report, is at {rejected}" in err
    assert hash_tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.rejected"]
    # The evidence: a complete artifact whose manifest, report and gate record say it failed.
    m = _manifest(rejected)
    assert not schema_errors(m) and verify_artifact(rejected).ok
    # (weight-only INT8 is off by 2e-5 everywhere: no layer where the error jumps)
    assert m["validation"]["passed"] is False and "first_divergence" in m["validation"]
    assert json.loads((rejected / "validation.json").read_text())["passed"] is False
    assert "FAIL" in (rejected / "report.md").read_text()
    assert str(rejected) in (rejected / "report.json").read_text()
    assert (rejected / "engines" / "rtx-4090" / "model.engine").is_file()
    # A second failure replaces the earlier evidence; OUT still stays as it was.
    code, _, err = run_cli(
        [
            "build",
            str(TINY_QWEN2),
            "--profile",
            "rtx-4090",
            "--int8",
            "--weight-only",
            "--samples",
            "4",
            "--seq-len",
            "32",
            "-o",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 1 and "is at" in err and hash_tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.rejected"]


@needs_rtx
def test_int8_build_rerun_reuses_and_option_change_reruns(int8_build, tmp_path, capsys):
    art, argv = int8_build
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    argv = [str(copy) if a == str(art) else a for a in argv]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and json.loads(out)["up_to_date"] is True
    # A different SmoothQuant alpha changes the quantize inputs: the graph stages and the
    # compile run again, and the new quantize record differs.
    old = _manifest(copy)["stages"]["quantize"]["input_hash"]
    code, out, err = run_cli([*argv, "--alpha", "0.3"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["up_to_date"] is False
    st = _manifest(copy)["stages"]
    assert st["quantize"]["status"] == "ran" and st["quantize"]["input_hash"] != old
    assert st["quantize"]["inputs"]["alpha"] == 0.3
    assert st["compile"]["profiles"]["rtx-4090"]["status"] == "ran"
    assert verify_artifact(copy).ok


@needs_rtx
def test_no_optimize_and_int4_awq(tmp_path, capsys):
    out = tmp_path / "int4"
    code, _, err = run_cli(
        [
            "build",
            str(TINY_QWEN2),
            "--profile",
            "a100",
            "--int4-awq",
            "--no-optimize",
            "--samples",
            "8",
            "--seq-len",
            "64",
            "-o",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    m = _manifest(out)
    assert m["stages"]["optimize"] == {"status": "not_run", "reason": "--no-optimize"}
    assert m["stages"]["quantize"]["status"] == "ran" and m["precision"] == "int4"
    ops = _ops(out / "model.onnx")
    assert ops.get("DequantizeLinear", 0) > 0 and "QuantizeLinear" not in ops  # W4A16
    assert "RMSNormalization" not in ops
    assert (out / "engines" / "a100-80gb" / "model.engine").is_file()
    v = _manifest(out)["validation"]
    assert v["kind"] == "gate" and v["passed"] and v["precision"] == "int4"
    assert verify_artifact(out).ok


@pytest.mark.parametrize(
    "flag, profile, needle",
    [
        ("--int4-awq", "t4", "int4 is not supported on t4 (SM75); this target can run"),
        ("--fp8", "a100", "fp8 is not supported on a100-80gb (SM80)"),
        ("--fp8", "jetson-orin", "fp8 is not supported on jetson-agx-orin-64gb"),
    ],
)
def test_illegal_precision_fails_before_any_work(
    tmp_path, checkpoints, capsys, monkeypatch, flag, profile, needle
):
    import dsc.export.onnx_export as ex

    def boom(*a, **k):
        raise AssertionError("exported before refusing the precision")

    monkeypatch.setattr(ex, "export_graph", boom)
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "--profile", profile, flag, "-o", str(out)], capsys
    )
    assert code == 4, err
    assert needle in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, needle, want",
    [
        # Flags that exclude each other are usage errors (2); a name or file that is not there is
        # bad input (3).
        (["--int8", "--fp8"], "choose one of --int8, --fp8, --int4-awq", 2),
        (["--fp8", "--weight-only"], "--weight-only applies to --int8 only", 2),
        (["--int8", "--dtype", "fp32"], "quantization needs a half-precision graph", 2),
        (["--no-optimize", "--disable-pass", "cse"], "contradict --no-optimize", 2),
        (["--disable-pass", "no-such-pass"], "unknown pass 'no-such-pass'", 3),
        (["--int8", "--calib", "/nonexistent/calib.txt"], "calibration data not found", 3),
    ],
)
def test_bad_quant_and_pass_options(tmp_path, checkpoints, capsys, argv, needle, want):
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "--profile", "rtx-4090", *argv, "-o", str(out)], capsys
    )
    assert code == want, err
    assert needle in err and err.count("\n") == 1  # one line, no progress before it
    assert not out.exists()


def test_config_file_quant_keys(tmp_path):
    from dsc.config_file import load_config_file
    from dsc.errors import BadInput

    (tmp_path / "calib.txt").write_text("some text\n")
    cfg = tmp_path / "dsc.yaml"
    cfg.write_text(
        "quantize: int8\nalpha: 0.6\ncalib: calib.txt\ncalib_samples: 16\n"
        "exclude: ['*.o_proj']\ndisable_passes: cse\noptimize: true\n"
    )
    got = load_config_file(cfg)
    assert got == {
        "quantize": "int8",
        "alpha": 0.6,
        "calib": str(tmp_path / "calib.txt"),
        "calib_samples": 16,
        "exclude": ("*.o_proj",),
        "disable_passes": ("cse",),
        "optimize": True,
    }
    for bad, needle in (
        ("quantize: int3\n", "one of int8, fp8, int4"),
        ("alpha: 2\n", "a number in [0, 1]"),
        ("calib_samples: 0\n", "a positive integer"),
    ):
        cfg.write_text(bad)
        with pytest.raises(BadInput, match=re.escape(needle)):
            load_config_file(cfg)


@needs_rtx
def test_build_from_config_file_quantizes(tmp_path, checkpoints, capsys):
    cfg = tmp_path / "dsc.yaml"
    cfg.write_text(
        f"checkpoint: {checkpoints['qwen2']}\noutput: out\nprofiles: rtx-4090\n"
        "quantize: int8\nweight_only: true\ncalib_samples: 4\ncalib_seq_len: 32\n"
    )
    code, _, err = run_cli(["build", "--config", str(cfg), "-q"], capsys)
    assert code == 0, err
    st = _manifest(tmp_path / "out")["stages"]["quantize"]
    assert st["scheme"] == "int8 weight-only" and st["samples"] <= 4 and st["seq_len"] == 32


def test_dsc_quantize_record_verifies(tmp_path, checkpoints, capsys):
    """`dsc quantize` writes a full stage record and refreshes graph/outputs: verify passes."""
    from dsc import api

    src = tmp_path / "fp16"
    api.export(checkpoints["qwen2"], src, dtype="fp16", progress=lambda m: None)
    out = tmp_path / "q"
    code, _, err = run_cli(
        ["quantize", str(src), "-o", str(out), "--int8", "--samples", "4", "--seq-len", "32"],
        capsys,
    )
    assert code == 0, err
    m = _manifest(out)
    assert not schema_errors(m)
    q = m["stages"]["quantize"]
    assert q["status"] == "ran" and q["input_hash"] and q["inputs"]["precision"] == "int8"
    # The build's formula: upstream is the input hash of the stage that wrote the input graph.
    assert q["inputs"]["upstream"] == _manifest(src)["stages"]["export"]["input_hash"]
    assert m["graph"]["hash"] != _manifest(src)["graph"]["hash"]
    assert m["precision"] == "int8"
    code, out_text, err = run_cli(["verify", str(out)], capsys)
    assert code == 0, err + out_text
    code, _, err = run_cli(["quantize", str(out), "-o", str(tmp_path / "qq"), "--int8"], capsys)
    assert code == 3 and "already quantized" in err


@needs_rtx
def test_locator_skips_tensors_smoothing_rescaled_on_purpose(int8_build):
    """SmoothQuant divides norm outputs (and up/v projections) by s per channel: those tensors
    differ from the reference by design, carry `dsc.rescaled`, and are not compared."""
    import onnx_ir as ir

    from dsc.validate.locate import RESCALED_KEY, layer_errors

    art, _ = int8_build
    cand = ir.load(str(art / "model.onnx"))
    rescaled = {n.outputs[0].name for n in cand.graph if RESCALED_KEY in n.metadata_props}
    smoothed = json.loads((art / "quant_report.json").read_text())["smoothquant"]["smoothed"]
    assert smoothed and set(smoothed) <= rescaled  # every smoothed activation is marked
    ids = np.arange(1, 17, dtype=np.int64)[None]
    errors = layer_errors(art / "model.onnx", art / "reference" / "model.onnx", ids)
    assert errors and not {e.tensor for e in errors} & rescaled


@needs_rtx
def test_compile_checks_the_artifacts_quantized_precision(int8_build, tmp_path, capsys):
    """`dsc compile` of an INT8 artifact for a target that cannot run it fails before building;
    one that can gets its engine."""
    art, _ = int8_build
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    code, _, err = run_cli(["compile", str(copy), "--profile", "a100", "-q"], capsys)
    assert code == 0, err
    assert (copy / "engines" / "a100-80gb" / "model.engine").is_file()
    m = _manifest(copy)
    assert m["profiles"]["a100-80gb"]["plan"]["precision"] == "int8"
    # The precision check dsc compile makes (from model_io.json's "quantization"):
    from dsc.errors import Unsupported
    from dsc.pipeline.targets import resolve_targets

    cfg = json.loads((art / "config.json").read_text())
    with pytest.raises(Unsupported, match="fp8 is not supported on a100-80gb"):
        resolve_targets(["a100"], model_config=cfg, model_name="m", dtype="fp16", quantize="fp8")
    with pytest.raises(Unsupported, match="int4 is not supported on t4"):
        resolve_targets(["t4"], model_config=cfg, model_name="m", dtype="fp16", quantize="int4")


@pytest.mark.skipif(Flavour.RTX not in available_backends(), reason="tensorrt_rtx is not installed")
def test_quantized_lm_head_and_embedding_pass_the_gate_with_sm80_and_sm89_engines(tmp_path, capsys):
    """Issue 18: trained tiny-qwen2, int4-awq body, int4 lm_head, int8 embedding."""
    out = tmp_path / "vocab"
    code, _, err = run_cli(
        [
            "build",
            str(TINY_QWEN2),
            "--profile",
            "a100-80gb,rtx-4090",
            "--int4-awq",
            "--quantize-lm-head",
            "int4",
            "--quantize-embedding",
            "int8",
            "--samples",
            "8",
            "--seq-len",
            "64",
            "-o",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    m = _manifest(out)
    q = m["stages"]["quantize"]
    assert q["lm_head"]["precision"] == "int4" and q["lm_head"]["block_size"] == 128
    assert q["embedding"]["precision"] == "int8" and q["embedding"]["block_size"] is None
    assert q["lm_head"]["bytes_after"] < q["lm_head"]["bytes_before"] / 3
    for name, sm in (("a100-80gb", 80), ("rtx-4090", 89)):
        eng = m["profiles"][name]["engine"]
        assert eng["target_sm"] == sm and (out / eng["path"]).is_file()
    v = m["validation"]
    assert v["kind"] == "gate" and v["passed"], v
    assert verify_artifact(out).ok
