"""`dsc validate/bench --engine`, `dsc device-check`: plumbing into files, manifest and report.

Run with the STAND-IN runtime (`--runtime standin`: ONNX Runtime executing the engine's ONNX
graph behind the TensorRT API; not TensorRT) since there is no GPU here. The numbers checked
are the gate's and the roofline arithmetic's, not TensorRT's speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsc import api
from dsc.backends.tensorrt import ShapeEnvelope
from dsc.runtime import standin
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
ENVELOPE = ShapeEnvelope(max_batch=4, max_input_len=32, max_kv=64, max_num_tokens=128)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-eval") / "v3-fp16"
    api.export(
        REPO / "examples/models/tiny-deepseek-v3", out, dtype="fp16", progress=lambda m: None
    )
    standin.install_engine(out, "l4", ENVELOPE, sm=89)
    return out


GATE = ["--window", "32", "--windows", "4", "--prompts", "2", "--gen-len", "6"]


def test_validate_engine_passes_and_is_recorded(artifact, capsys):
    """Stand-in engine of the fp16 export against the fp16 graph: identical logits, so the gate
    passes with KL 0 and every top-1 equal; the record lands in file, manifest and report."""
    code, out, err = run_cli(
        ["validate", str(artifact), "--engine", "l4", "--runtime", "standin", *GATE, "--json"],
        capsys,
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["passed"] and r["prefill"]["top1"] == 1.0 and r["prefill"]["kl_mean"] == 0.0
    assert r["perplexity"]["delta"] == 0.0 and r["greedy"]["greedy_match"] == 1.0
    assert r["runtime"].startswith("standin") and r["engine"]["path"] == "engines/l4/model.engine"
    assert r["graph_stats"]["profile_steps"]["0"] >= 1  # prefills on profile 0
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["engine_runs"]["l4"]["validation"]["passed"] is True
    assert "validation-engine-l4.json" in m["outputs"]
    rep = json.loads((artifact / "report.json").read_text())
    assert any(v["file"] == "validation-engine-l4.json" for v in rep["validations"])
    code, out, err = run_cli(["verify", str(artifact)], capsys)
    assert code == 0, out + err


def test_bench_engine_rows_roofline_and_report(artifact, capsys):
    code, out, err = run_cli(
        [
            "bench",
            str(artifact),
            "--engine",
            "l4",
            "--runtime",
            "standin",
            "--batch",
            "1,2",
            "--prompt-len",
            "8",
            "--gen-len",
            "4",
            "--repeats",
            "2",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    r = json.loads(out)
    assert [run["cuda_graphs"] for run in r["runs"]] == [True, False]
    assert "stand-in" in r["note"]
    on, off = r["runs"]
    # warmup 2 + 2 repeats: each of the 3 decode shapes per batch eager once, captured once,
    # replayed twice; without graphs every step is eager.
    assert on["graph_stats"]["graph_captures"] == 2 * 3
    assert on["graph_stats"]["graph_replays"] == 2 * 3 * 2
    assert off["graph_stats"]["graph_captures"] == 0
    from dsc.hardware import load_profile
    from dsc.plan import plan

    for run in r["runs"]:
        assert [(x["batch"], x["prompt_len"]) for x in run["rows"]] == [(1, 8), (2, 8)]
        for row in run["rows"]:
            ceiling = plan(
                artifact / "config.json", load_profile("l4"), "fp16", batch=row["batch"], context=12
            ).decode_tokens_per_s
            assert row["decode_ceiling_tokens_per_s"] == pytest.approx(ceiling)
            assert row["fraction_of_roofline"] == pytest.approx(
                row["decode_tokens_per_s"] / ceiling
            )
            assert row["tpot"]["p50_ms"] <= row["tpot"]["p99_ms"]
    m = json.loads((artifact / "manifest.json").read_text())
    assert len(m["engine_runs"]["l4"]["bench"]["rows"]) == 4
    rep = json.loads((artifact / "report.json").read_text())
    assert rep["engine_benches"][0]["profile"] == "l4"
    md = (artifact / "report.md").read_text()
    assert "Engine latency: l4" in md and "of roofline" in md


def test_device_check_with_engine_present(artifact, capsys):
    code, out, err = run_cli(
        [
            "device-check",
            str(artifact),
            "--profile",
            "l4",
            "--runtime",
            "standin",
            "--window",
            "16",
            "--prompt-len",
            "8",
            "--gen-len",
            "3",
        ],
        capsys,
    )
    assert code == 0, err
    assert "[1/3] compile" in err and "not rebuilt" in err and "[3/3] bench" in err
    assert "gate PASS" in out


def test_engine_bad_inputs_exit_4_one_line(artifact, capsys, tmp_path):
    # no GPU here: the real runtimes refuse
    code, _, err = run_cli(
        ["validate", str(artifact), "--engine", "l4", "--runtime", "tensorrt"], capsys
    )
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err, err
    # an engine built for another TensorRT version / SM than the device's
    import shutil

    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    standin.install_engine(other, "l4", ENVELOPE, sm=89, trt_version="10.13.2")
    code, _, err = run_cli(["bench", str(other), "--engine", "l4", "--runtime", "standin"], capsys)
    assert code == 4 and "10.13.2" in err and standin.__version__ in err
    assert err.count("\n") == 1
    standin.install_engine(other, "l4", ENVELOPE, sm=90)
    code, _, err = run_cli(
        ["validate", str(other), "--engine", "l4", "--runtime", "standin"], capsys
    )
    assert code == 4 and "SM90" in err and "SM89" in err and err.count("\n") == 1
    # a window beyond the engine's max input length: outside every profile
    code, _, err = run_cli(
        [
            "validate",
            str(artifact),
            "--engine",
            "l4",
            "--runtime",
            "standin",
            "--window",
            "64",
            "--windows",
            "1",
        ],
        capsys,
    )
    assert code == 4 and "outside every optimization profile" in err
    # unknown profile; --runtime without --engine
    code, _, err = run_cli(["validate", str(artifact), "--engine", "h100"], capsys)
    assert code == 3 and "no profile 'h100'" in err
    code, _, err = run_cli(["bench", str(artifact), "--runtime", "standin"], capsys)
    assert code == 2


def test_device_check_of_a_preflight_without_gpu_exits_4(artifact, tmp_path, capsys):
    """A profile awaiting its device build: no GPU/TensorRT here, so exit 4 before any build,
    one line, manifest untouched; the stand-in refuses to pretend to build."""
    import shutil

    other = tmp_path / "pre"
    shutil.copytree(artifact, other)
    m = json.loads((other / "manifest.json").read_text())
    rec = m["profiles"]["l4"]
    rec.update(status="awaiting_device_build", engine=None)
    (other / "manifest.json").write_text(json.dumps(m))
    before = (other / "manifest.json").read_bytes()
    code, _, err = run_cli(["device-check", str(other), "--profile", "l4", "-q"], capsys)
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err, err
    assert (other / "manifest.json").read_bytes() == before
    code, _, err = run_cli(
        ["device-check", str(other), "--profile", "l4", "-q", "--runtime", "standin"], capsys
    )
    assert code == 4 and "cannot build engines" in err
    code, _, err = run_cli(["device-check", str(other), "--profile", "h100", "-q"], capsys)
    assert code == 3 and "no profile 'h100'" in err


def test_reference_engine_when_the_reference_artifact_has_one(artifact, tmp_path, capsys):
    """--reference DIR holding an engine for the profile: that engine is the reference (both
    through the stand-in here, so the gate sees identical logits)."""
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(artifact, ref)
    code, out, err = run_cli(
        [
            "validate",
            str(artifact),
            "--engine",
            "l4",
            "--runtime",
            "standin",
            "--reference",
            str(ref),
            "--window",
            "16",
            "--windows",
            "2",
            "--prompts",
            "1",
            "--gen-len",
            "3",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["reference"].startswith(f"{ref} engine l4") and r["prefill"]["kl_mean"] == 0.0
