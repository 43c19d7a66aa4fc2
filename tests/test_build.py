"""`dsc build` / `dsc compile` end to end: engines, preflights, manifest, reuse, failure paths.

One real matrix build (qwen2 fixture, fp16, a100 + rtx-4090 + h100 + jetson-orin) is made once
for the module; tests that change it work on a copy. TensorRT-RTX compiles for real (no GPU);
standard TensorRT is replaced by a fake where it is absent, and its real test is skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from dsc.backends.tensorrt import EngineBuildResult, Flavour, available_backends
from dsc.manifest import schema_errors, sha256_file
from dsc.models.checkpoint import inspect_checkpoint

from .conftest import run_cli

MATRIX = "a100,rtx-4090,h100,jetson-orin"
BUILT = ("a100-80gb", "rtx-4090")
PENDING = ("h100-sxm", "jetson-agx-orin-64gb")

needs_rtx = pytest.mark.skipif(
    Flavour.RTX not in available_backends(),
    reason="tensorrt_rtx is not installed (pip install 'dsc[rtx]')",
)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """run_cli for module-scoped fixtures (no capsys there)."""
    from dsc.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def counts(monkeypatch):
    """Count export and engine-build runs (the real functions still run)."""
    import dsc.export.onnx_export as ex
    import dsc.pipeline.engines as eng

    n = {"export": 0, "compile": 0}
    real_export, real_build = ex.export_graph, eng.build_engine

    def export_graph(*a, **k):
        n["export"] += 1
        return real_export(*a, **k)

    def build_engine(*a, **k):
        n["compile"] += 1
        return real_build(*a, **k)

    monkeypatch.setattr(ex, "export_graph", export_graph)
    monkeypatch.setattr(eng, "build_engine", build_engine)
    return n


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, checkpoints):
    if Flavour.RTX not in available_backends():
        pytest.skip("tensorrt_rtx is not installed (pip install 'dsc[rtx]')")
    out = tmp_path_factory.mktemp("matrix") / "art"
    code, stdout, stderr = _cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(out), "--profile", MATRIX]
    )
    assert code == 0, stderr
    return out, stdout, stderr


@pytest.fixture
def matrix_copy(matrix, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(matrix[0], dst)
    return dst


# --- the matrix build -----------------------------------------------------------------------


def test_matrix_builds_two_engines_and_two_preflights(matrix, checkpoints):
    art, stdout, stderr = matrix
    m = _manifest(art)
    assert schema_errors(m) == []
    assert set(m["profiles"]) == set(BUILT) | set(PENDING)
    for name, sm in zip(BUILT, (80, 89), strict=True):
        p = m["profiles"][name]
        assert p["status"] == "built" and p["mode"] == "rtx"
        eng = p["engine"]
        path = art / eng["path"]
        assert path == art / "engines" / name / "model.engine"
        assert eng["size_bytes"] == path.stat().st_size > 100_000
        assert eng["sha256"] == sha256_file(path)
        assert eng["backend"] == "tensorrt_rtx" and eng["target_sm"] == sm
        assert "TensorRT-RTX runtime" in eng["runtime"]
        summary = json.loads((art / "engines" / name / "build.json").read_text())
        assert summary["target_sm"] == sm and summary["size_bytes"] == eng["size_bytes"]
        assert [pr["name"] for pr in summary["profiles"]] == ["prefill", "decode"]
        assert any("ONNX IR version" in r["message"] for r in summary["log"])
        # Envelope: the profile's batch, the KV capped at the model's 512 positions.
        assert p["envelope"] == {
            "max_batch": 64 if name == "a100-80gb" else 16,
            "max_input_len": 512,
            "max_kv": 512,
            "max_num_tokens": 8192,
        }
        assert p["plan"]["fits"] is True and p["plan"]["total_bytes"] > 0
        assert p["options"]["workspace_mib"] == int(p["profile"]["builder"]["workspace_gb"] * 1024)
    for name, pre_sm, sm in (("h100-sxm", 89, 90), ("jetson-agx-orin-64gb", 80, 87)):
        p = m["profiles"][name]
        assert p["status"] == "awaiting_device_build" and p["engine"] is None
        assert p["sm"] == sm
        assert p["preflight"]["sm"] == pre_sm and p["preflight"]["passed"] is True
        assert p["preflight"]["size_bytes"] > 100_000
        d = art / "engines" / name
        assert not (d / "model.engine").exists()
        script = (d / "trtexec.sh").read_text()
        assert p["device_command"] == f"engines/{name}/trtexec.sh"
        assert os.access(d / "trtexec.sh", os.X_OK)
        for flag in (
            "--onnx=model.onnx",
            f"--saveEngine=engines/{name}/model.engine",
            "--profile=0",
            "--profile=1",
            "--stronglyTyped",
            "--memPoolSize=workspace:",
            "--builderOptimizationLevel=3",
            f"--timingCacheFile=engines/{name}/",
        ):
            assert flag in script, flag
            # prefill batch: min(max_batch, max_num_tokens 8192 // 512); decode keeps max_batch
            assert (
                "input_ids:16x512" in script and "input_ids:64x1," in script
                if name == "h100-sxm"
                else "input_ids:8x512" in script
            )
        pre = json.loads((d / "preflight.json").read_text())
        assert pre["sm"] == pre_sm and pre["stands_in_for"] == sm
    # Plain words: which engines exist and which wait for the device.
    built_part, pending_part = stdout.split("engines NOT built here")
    for name in BUILT:
        assert f"{art}/engines/{name}/model.engine" in built_part
    for name in PENDING:
        assert name not in built_part
        assert f"dsc compile {art} --profile {name}" in pending_part
    for line in (
        "[1/5] export",
        "[2/5] optimize  graph passes for portable",
        "[3/5] quantize  not run",
        "[4/5] compile",
        "[5/5] validate",
    ):
        assert line in stderr
    assert not _leftovers(art.parent)


def test_matrix_manifest_records_inputs_stages_and_outputs(matrix, checkpoints):
    art = matrix[0]
    m = _manifest(art)
    ck = checkpoints["qwen2"]
    info = inspect_checkpoint(ck)
    assert m["source"]["inputs"] == {
        p.relative_to(ck).as_posix(): sha256_file(p) for p in info.input_files()
    }
    assert m["tools"]["tensorrt-rtx-cu13"] and m["tools"]["onnxruntime"] and m["tools"]["torch"]
    st = m["stages"]
    assert st["export"]["status"] == "ran" and st["export"]["seconds"] > 0
    assert st["export"]["inputs"]["dtype"] == "fp16"
    # Graph passes run by default; the matrix mixes TensorRT-RTX and standard TensorRT
    # targets, so the fused ops are the portable ones every parser takes.
    assert st["optimize"]["status"] == "ran"
    assert st["optimize"]["inputs"]["target"]["name"].startswith("portable")
    assert set(st["optimize"]["outputs"]) == {"model.onnx", "model_io.json", "passes_report.json"}
    assert "model.onnx" not in st["export"]["outputs"]
    assert all(c["fused"] == c["blocks"] for c in st["optimize"]["coverage"].values())
    assert st["quantize"] == {"status": "not_run", "reason": "no quantization requested"}
    assert set(st["compile"]["profiles"]) == set(BUILT) | set(PENDING)
    assert {r["status"] for r in st["compile"]["profiles"].values()} == {"ran"}
    # Stage input hashes differ per profile; outputs are exactly the files under engines/<p>/.
    hashes = {r["input_hash"] for r in st["compile"]["profiles"].values()}
    assert len(hashes) == 4
    for name, r in st["compile"]["profiles"].items():
        files = {p.relative_to(art).as_posix() for p in (art / "engines" / name).iterdir()}
        assert set(r["outputs"]) == files
    v = m["validation"]
    assert v["kind"] == "smoke" and v["passed"] is True and v["finite"] is True
    assert len(v["generated_tokens"]) == 8 and v["kv_rel_diff"] < 2e-2
    assert "dsc validate" in v["note"]
    assert st["validate"]["result"]["graph"] == m["graph"]["onnx"] == "model.onnx"
    # The graph the smoke check ran is the one every compile stage hashed.
    assert {r["inputs"]["graph"] for r in st["compile"]["profiles"].values()} == {
        m["graph"]["hash"]
    }
    on_disk = {
        p.relative_to(art).as_posix()
        for p in art.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(m["outputs"]) == on_disk
    for rel, digest in m["outputs"].items():
        assert sha256_file(art / rel) == digest, rel
    log = (art / "build.log").read_text()
    assert "[a100-80gb] INFO" in log and "[5/5] validate" in log
    assert str(art.resolve()) in (art / "report.md").read_text()
    assert ".tmp-" not in (art / "report.json").read_text()


def test_rerun_is_up_to_date_and_does_no_work(matrix, checkpoints, counts, capsys):
    art = matrix[0]
    before = (art / "manifest.json").read_bytes()
    engine_inode = (art / "engines/a100-80gb/model.engine").stat().st_ino
    code, out, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(art), "--profile", MATRIX, "--json"], capsys
    )
    assert code == 0, err
    assert counts == {"export": 0, "compile": 0}
    doc = json.loads(out)  # one JSON document, nothing else on stdout
    assert doc["up_to_date"] is True
    assert {n: p["built_here"] for n, p in doc["profiles"].items()} == {
        "a100-80gb": True,
        "rtx-4090": True,
        "h100-sxm": False,
        "jetson-agx-orin-64gb": False,
    }
    assert (
        doc["profiles"]["h100-sxm"]["finish_on_device"] == f"dsc compile {art} --profile h100-sxm"
    )
    assert (art / "manifest.json").read_bytes() == before
    assert (art / "engines/a100-80gb/model.engine").stat().st_ino == engine_inode
    # With --json the progress lines stay off stderr (up_to_date above says nothing ran).
    assert err == ""


def test_changed_envelope_recompiles_without_exporting(matrix_copy, checkpoints, counts, capsys):
    art = matrix_copy
    old = _manifest(art)
    # a100 with h100 keeps the matrix's pass target (portable ops: h100 is standard TensorRT),
    # so the graph is the same; a100 alone would get TensorRT-RTX's fused ops, a new graph.
    code, out, err = run_cli(
        [
            "build",
            str(checkpoints["qwen2"]),
            "-o",
            str(art),
            "--profile",
            "a100,h100",
            "--max-batch",
            "2",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert counts == {"export": 0, "compile": 2}
    m = _manifest(art)
    assert m["stages"]["export"]["status"] == "reused"
    assert m["stages"]["export"]["input_hash"] == old["stages"]["export"]["input_hash"]
    assert m["stages"]["validate"]["status"] == "reused"
    assert m["stages"]["compile"]["profiles"]["a100-80gb"]["status"] == "ran"
    assert set(m["profiles"]) == {"a100-80gb", "h100-sxm"}
    assert not (art / "engines/rtx-4090").exists()
    assert m["profiles"]["a100-80gb"]["envelope"]["max_batch"] == 2
    shapes = json.loads((art / "engines/a100-80gb/build.json").read_text())["profiles"][0]
    assert shapes["shapes"]["input_ids"]["max"] == [2, 512]
    assert m["outputs"]["model.onnx"] == old["outputs"]["model.onnx"]
    assert schema_errors(m) == []
    code, _, err = run_cli(["verify", str(art)], capsys)
    assert code == 0, err


def test_gate_results_survive_a_rebuild_of_the_same_graph(matrix_copy, checkpoints, capsys):
    art = matrix_copy
    code, _, err = run_cli(
        [
            "validate",
            str(art),
            "--windows",
            "2",
            "--window",
            "32",
            "--prompts",
            "2",
            "--gen-len",
            "8",
        ],
        capsys,
    )
    assert code == 0, err
    gate = _manifest(art)["validation"]
    assert gate["kind"] == "gate"
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(art), "--profile", "a100,h100", "-q"], capsys
    )
    assert code == 0, err
    m = _manifest(art)
    assert m["validation"] == gate and m["stages"]["validate"]["result"]["kind"] == "smoke"
    assert "validation.json" in m["outputs"] and (art / "validation.json").is_file()
    assert "Validation (fp16): PASS" in (art / "report.md").read_text()
    code, _, _ = run_cli(["verify", str(art)], capsys)
    assert code == 0


def test_a_changed_checkpoint_is_exported_again(matrix_copy, checkpoints, tmp_path, counts, capsys):
    """Same checkpoint directory, new content: no --force needed, export and compile re-run."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoints["qwen2"], ck)
    art = matrix_copy
    m = _manifest(art)
    m["source"]["checkpoint"] = str(ck.resolve())  # as if the matrix had been built from ck
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10
    (ck / "config.json").write_text(json.dumps(cfg, indent=2))
    code, _, err = run_cli(["build", str(ck), "-o", str(art), "--profile", "a100", "-q"], capsys)
    assert code == 0, err
    assert counts == {"export": 1, "compile": 1}
    after = _manifest(art)
    assert after["stages"]["export"]["status"] == "ran"
    assert after["stages"]["export"]["input_hash"] != m["stages"]["export"]["input_hash"]
    assert after["source"]["inputs"]["config.json"] == sha256_file(ck / "config.json")
    assert after["graph"]["hash"] != m["graph"]["hash"]
    assert after["stages"]["validate"]["status"] == "ran"


def test_tampering_is_caught_by_verify_and_rebuilt_by_build(
    matrix_copy, checkpoints, counts, capsys
):
    art = matrix_copy
    code, out, _ = run_cli(["verify", str(art)], capsys)
    assert code == 0 and out.startswith("OK: ")
    engine = art / "engines/rtx-4090/model.engine"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0x01
    engine.write_bytes(bytes(data))
    code, out, err = run_cli(["verify", str(art)], capsys)
    assert code == 1
    assert "MISMATCH engines/rtx-4090/model.engine" in out
    assert "engines/rtx-4090/model.engine" in err and err.startswith("dsc: error:")
    # The same build again: only the tampered engine is compiled again.
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(art), "--profile", MATRIX, "-q"], capsys
    )
    assert code == 0, err
    assert counts == {"export": 0, "compile": 1}
    m = _manifest(art)
    assert m["stages"]["compile"]["profiles"]["rtx-4090"]["status"] == "ran"
    assert m["stages"]["compile"]["profiles"]["a100-80gb"]["status"] == "reused"
    code, _, _ = run_cli(["verify", str(art)], capsys)
    assert code == 0


def test_verify_names_missing_and_unlisted_files(matrix_copy, capsys):
    art = matrix_copy
    (art / "engines/h100-sxm/trtexec.sh").unlink()
    (art / "stray.txt").write_text("not from dsc")
    code, out, err = run_cli(["verify", str(art), "--json"], capsys)
    assert code == 1
    problems = {p["file"]: p["problem"] for p in json.loads(out)["problems"]}
    assert problems == {
        "engines/h100-sxm/trtexec.sh": "missing",
        "stray.txt": "not listed in the manifest",
    }


def test_inspect_summarises_engines_and_preflights(matrix, capsys):
    art = matrix[0]
    code, out, err = run_cli(["inspect", str(art)], capsys)
    assert code == 0, err
    assert "built: engines/a100-80gb/model.engine" in out
    assert "h100-sxm" in out and "NOT built here: preflight for SM89 passed" in out
    assert "quantize  not run (no quantization requested)" in out
    assert "validation: smoke passed" in out
    code, out, _ = run_cli(["inspect", str(art), "--json"], capsys)
    s = json.loads(out)
    assert (
        s["profiles"]["rtx-4090"]["engine_bytes"]
        == (art / "engines/rtx-4090/model.engine").stat().st_size
    )
    assert s["profiles"]["jetson-agx-orin-64gb"]["preflight_sm"] == 80
    assert s["files"] == len(_manifest(art)["outputs"])


# --- dsc compile ----------------------------------------------------------------------------


@needs_rtx
def test_compile_adds_engines_to_an_exported_artifact(exported, tmp_path, counts, capsys):
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    before = _manifest(art)
    code, out, err = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            "rtx-4090",
            "--max-batch",
            "2",
            "--max-kv",
            "128",
            "--max-num-tokens",
            "128",
        ],
        capsys,
    )
    assert code == 0, err
    assert counts["compile"] == 1
    m = _manifest(art)
    assert schema_errors(m) == []
    assert m["command"] == "compile"
    assert m["stages"]["export"] == before["stages"]["export"]
    for rel, digest in before["outputs"].items():
        assert m["outputs"][rel] == digest == sha256_file(art / rel)
    eng = m["profiles"]["rtx-4090"]["engine"]
    assert (art / eng["path"]).stat().st_size == eng["size_bytes"] > 0
    assert m["profiles"]["rtx-4090"]["envelope"] == {
        "max_batch": 2,
        "max_input_len": 128,
        "max_kv": 128,
        "max_num_tokens": 128,
    }
    # One prefill pass holds 128 // 128 = 1 sequence; decode keeps batch 2.
    built = json.loads((art / "engines" / "rtx-4090" / "build.json").read_text())
    prefill, decode = built["profiles"]
    assert prefill["shapes"]["input_ids"]["max"] == [1, 128]
    assert decode["shapes"]["input_ids"]["max"] == [2, 1]
    assert "engines built:" in out
    # Again: nothing to do. Then a device-only profile: preflight, rtx-4090 kept.
    code, out, _ = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            "rtx-4090",
            "--max-batch",
            "2",
            "--max-kv",
            "128",
            "--max-num-tokens",
            "128",
        ],
        capsys,
    )
    assert code == 0 and "up to date" in out and counts["compile"] == 1
    code, out, err = run_cli(["compile", str(art), "--profile", "jetson-orin-nano-8gb"], capsys)
    assert code == 0, err
    m = _manifest(art)
    assert set(m["profiles"]) == {"rtx-4090", "jetson-orin-nano-8gb"}
    assert m["profiles"]["jetson-orin-nano-8gb"]["status"] == "awaiting_device_build"
    assert "dsc compile" in out and "NOT built here" in out
    code, _, _ = run_cli(["verify", str(art)], capsys)
    assert code == 0
    assert "== dsc compile at" in (art / "build.log").read_text()


@needs_rtx
def test_compile_keeps_records_it_does_not_own(exported, tmp_path, capsys):
    """A stage record another tool wrote outside the schema is kept, not refused or repaired."""
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    m = _manifest(art)
    m["stages"]["quantize"] = {"precision": "int8", "seconds": 1.0}  # no status
    (art / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(["compile", str(art), "--profile", "rtx-4090", "--max-kv", "64"], capsys)
    assert code == 0, err
    assert "did not match the schema" in err
    after = _manifest(art)
    assert after["stages"]["quantize"] == {"precision": "int8", "seconds": 1.0}
    assert after["profiles"]["rtx-4090"]["status"] == "built"


class _FakeStandardTensorRT:
    """Stands in for `build_engine` with standard TensorRT on a device (not installable here)."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx_path, envelope, options, *, backend, io_spec, engine_path=None):
        from dsc.backends.tensorrt import io_roles_from_spec, profile_shapes

        assert backend == "tensorrt", backend
        self.calls.append(options)
        Path(engine_path).write_bytes(b"fake standard TensorRT engine " + b"\0" * 4096)
        if options.timing_cache is not None:
            Path(options.timing_cache).write_bytes(b"fake timing cache")
        return EngineBuildResult(
            engine=None,
            engine_path=Path(engine_path),
            size_bytes=4126,
            build_seconds=0.5,
            flavour=Flavour.TENSORRT,
            trt_version="10.3.0",
            target_sm=options.target_sm,
            num_layers=10,
            profiles=profile_shapes(io_roles_from_spec(io_spec), envelope),
            strongly_typed=True,
            timing_cache_path=options.timing_cache,
            options=options,
        )


@needs_rtx
def test_compile_on_the_device_with_standard_tensorrt(exported, tmp_path, monkeypatch, capsys):
    import dsc.pipeline.engines as eng
    import dsc.pipeline.targets as tg

    fake = _FakeStandardTensorRT()
    monkeypatch.setattr(tg, "available_backends", lambda: [Flavour.TENSORRT, Flavour.RTX])
    monkeypatch.setattr(tg, "local_gpu_sm", lambda: 87)
    monkeypatch.setattr(eng, "build_engine", fake)
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    code, out, err = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            "jetson-orin",
            "--dla-core",
            "1",
            "--max-batch",
            "1",
            "--max-kv",
            "256",
        ],
        capsys,
    )
    assert code == 0, err
    (opts,) = fake.calls
    assert opts.dla_core == 1 and opts.gpu_fallback and opts.target_sm == 87
    assert opts.workspace_mib == 4096 and opts.optimization_level == 3
    m = _manifest(art)
    p = m["profiles"]["jetson-agx-orin-64gb"]
    assert p["status"] == "built" and p["mode"] == "device" and p["preflight"] is None
    assert p["engine"]["backend"] == "tensorrt" and p["engine"]["trt_version"] == "10.3.0"
    assert p["timing_cache"]["path"] == "engines/jetson-agx-orin-64gb/timing.cache"
    assert "standard TensorRT, on this GPU" in out
    # A rebuild reuses the saved timing cache (copied in before the builder loads it).
    code, _, err = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            "jetson-orin",
            "--dla-core",
            "1",
            "--max-batch",
            "1",
            "--max-kv",
            "256",
            "--rebuild",
        ],
        capsys,
    )
    assert code == 0, err
    assert (
        "loaded from the previous artifact"
        in _manifest(art)["profiles"]["jetson-agx-orin-64gb"]["timing_cache"]["note"]
    )
    # The wrong GPU is refused before any build.
    monkeypatch.setattr(tg, "local_gpu_sm", lambda: 86)
    code, _, err = run_cli(["compile", str(art), "--profile", "h100"], capsys)
    assert code == 4 and "SM86" in err and "SM90" in err
    assert len(fake.calls) == 2


def test_build_here_then_finish_on_the_device(
    matrix_copy, checkpoints, monkeypatch, counts, capsys
):
    """CI builds and preflights; on the Jetson `dsc compile` (no flags) builds the same envelope."""
    import dsc.pipeline.engines as eng
    import dsc.pipeline.targets as tg

    art = matrix_copy
    code, _, err = run_cli(
        [
            "build",
            str(checkpoints["qwen2"]),
            "-o",
            str(art),
            "--profile",
            "a100,jetson-orin",
            "--max-batch",
            "2",
            "--max-kv",
            "256",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert counts == {"export": 0, "compile": 2}
    script = (art / "engines/jetson-agx-orin-64gb/trtexec.sh").read_text()
    assert "input_ids:2x256" in script
    a100 = _manifest(art)["stages"]["compile"]["profiles"]["a100-80gb"]
    fake = _FakeStandardTensorRT()
    monkeypatch.setattr(tg, "available_backends", lambda: [Flavour.TENSORRT, Flavour.RTX])
    monkeypatch.setattr(tg, "local_gpu_sm", lambda: 87)
    monkeypatch.setattr(eng, "build_engine", fake)
    code, out, err = run_cli(["compile", str(art), "--profile", "jetson-orin"], capsys)
    assert code == 0, err
    m = _manifest(art)
    p = m["profiles"]["jetson-agx-orin-64gb"]
    assert p["status"] == "built" and p["envelope"] == {
        "max_batch": 2,
        "max_input_len": 256,
        "max_kv": 256,
        "max_num_tokens": 8192,
    }
    assert m["profiles"]["a100-80gb"]["status"] == "built"  # untouched
    assert m["stages"]["compile"]["profiles"]["a100-80gb"] == a100
    assert "engines NOT built here" not in out
    code, _, _ = run_cli(["verify", str(art)], capsys)
    assert code == 0


@needs_rtx
def test_standard_only_option_sends_an_rtx_target_to_the_device(exported, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    code, out, err = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            "a100",
            "--set",
            "builder.version_compatible=true",
            "--max-kv",
            "64",
        ],
        capsys,
    )
    assert code == 0, err
    p = _manifest(art)["profiles"]["a100-80gb"]
    assert p["status"] == "awaiting_device_build" and p["preflight"]["sm"] == 80
    assert any("version-compatible" in n for n in p["notes"])
    assert "--versionCompatible" in (art / "engines/a100-80gb/trtexec.sh").read_text()
    code, _, err = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            "a100",
            "--set",
            "builder.version_compatible=true",
            "--backend",
            "tensorrt_rtx",
        ],
        capsys,
    )
    assert code == 4 and "use --backend tensorrt" in err


@pytest.mark.tensorrt
@pytest.mark.skipif(
    Flavour.TENSORRT not in available_backends(),
    reason="standard TensorRT is not installed (not installable from the package "
    "registries here; it comes with JetPack or NVIDIA's index)",
)
def test_compile_with_real_standard_tensorrt(exported, tmp_path, capsys):  # pragma: no cover
    from dsc.pipeline.targets import local_gpu_sm

    sm = local_gpu_sm()
    if sm is None:
        pytest.skip("standard TensorRT needs a GPU to build")
    from dsc.hardware import list_profiles

    prof = next((p for p in list_profiles() if p.sm == sm), None)
    if prof is None:
        pytest.skip(f"no built-in profile for SM{sm}")
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    code, _, err = run_cli(
        [
            "compile",
            str(art),
            "--profile",
            prof.name,
            "--backend",
            "tensorrt",
            "--max-batch",
            "1",
            "--max-kv",
            "128",
        ],
        capsys,
    )
    assert code == 0, err
    assert _manifest(art)["profiles"][prof.name]["engine"]["backend"] == "tensorrt"


# --- failure paths: clear message, documented exit code, nothing left behind ----------------


def _assert_nothing_written(out: Path, counts: dict) -> None:
    assert not out.exists()
    assert not _leftovers(out.parent)
    assert counts == {"export": 0, "compile": 0}


def test_precision_the_target_cannot_run(tmp_path, checkpoints, counts, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(out), "--profile", "t4", "--dtype", "bf16"],
        capsys,
    )
    assert code == 4
    assert "bf16 is not supported on t4" in err and "legal: fp16, int8" in err
    code, _, err = run_cli(
        [
            "build",
            str(checkpoints["qwen2"]),
            "-o",
            str(out),
            "--profile",
            "a100,t4",
            "--dtype",
            "fp32",
        ],
        capsys,
    )
    assert code == 4 and "FP32 GEMM" in err and "t4" in err
    _assert_nothing_written(out, counts)


def test_model_that_does_not_fit(tmp_path, checkpoints, counts, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "build",
            str(checkpoints["deepseek_v3"]),
            "-o",
            str(out),
            "--profile",
            "jetson-orin-nano-4gb",
            "--max-batch",
            "20000",
        ],
        capsys,
    )
    assert code == 6
    assert "does not fit jetson-orin-nano-4gb" in err and "best remedy: batch <= " in err
    code, _, err = run_cli(
        [
            "build",
            str(checkpoints["qwen2"]),
            "-o",
            str(out),
            "--profile",
            "a100",
            "--set",
            "memory.gb=9.001",
        ],
        capsys,
    )
    assert code == 6 and "a100-80gb" in err
    _assert_nothing_written(out, counts)


def test_unknown_profile_suggests_the_closest(tmp_path, checkpoints, counts, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(out), "--profile", "a100,rtx4090"], capsys
    )
    assert code == 3
    assert "unknown profile 'rtx4090'" in err and "did you mean 'rtx-4090'" in err
    code, _, err = run_cli(["build", str(checkpoints["qwen2"]), "-o", str(out)], capsys)
    assert code == 3 and "no hardware profile" in err
    _assert_nothing_written(out, counts)


def _corrupt_graph(art: Path) -> str:
    """Turn one node into an operator nothing implements; re-record the hashes (as a buggy
    pass would leave a consistent but uncompilable artifact). Returns the node's name."""
    from dsc.manifest import graph_record, hash_tree

    model = onnx.load(str(art / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type in ("Softmax", "Mul"))
    node.op_type = "MysteryOp"
    onnx.save(model, str(art / "model.onnx"))
    m = _manifest(art)
    m["outputs"] = hash_tree(art)
    m["graph"] = graph_record(art, json.loads((art / "model_io.json").read_text()))
    for st in m["stages"].values():  # consistent: verify compares stage records with outputs
        st["outputs"] = {k: m["outputs"][k] for k in st.get("outputs", {})}
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    return node.name


@needs_rtx
def test_compile_failure_from_tensorrt_names_the_node(exported, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    node = _corrupt_graph(art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    code, _, err = run_cli(["compile", str(art), "--profile", "a100", "--max-kv", "64"], capsys)
    assert code == 7
    assert "a100-80gb: engine build:" in err and "could not parse model.onnx" in err
    assert node in err and "MysteryOp" in err
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert not _leftovers(tmp_path)


def test_compile_refuses_a_changed_graph(exported, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    with (art / "model.onnx").open("ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(["compile", str(art), "--profile", "a100"], capsys)
    assert code == 1 and "model.onnx does not match manifest.json" in err


@needs_rtx
def test_interrupt_leaves_nothing_behind(tmp_path, checkpoints, monkeypatch, capsys):
    import dsc.export.onnx_export as ex

    def interrupted(info, out_dir, **kw):
        (out_dir / "model.onnx").write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "export_graph", interrupted)
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(out), "--profile", "a100"], capsys
    )
    assert code == 130 and "interrupted" in err
    assert not out.exists() and not _leftovers(tmp_path)


@needs_rtx
def test_interrupted_compile_keeps_the_artifact(exported, tmp_path, monkeypatch, capsys):
    import dsc.pipeline.engines as eng

    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}

    def interrupted(*a, engine_path=None, **k):
        Path(engine_path).write_bytes(b"half an engine")
        raise KeyboardInterrupt

    monkeypatch.setattr(eng, "build_engine", interrupted)
    code, _, _ = run_cli(["compile", str(art), "--profile", "a100"], capsys)
    assert code == 130
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert not _leftovers(tmp_path)


@needs_rtx
def test_artifact_of_another_checkpoint_needs_force(
    exported, tmp_path, checkpoints, counts, capsys
):
    art = tmp_path / "art"
    shutil.copytree(exported["llama"], art)
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(art), "--profile", "a100"], capsys
    )
    assert code == 5 and "another checkpoint" in err and "--force" in err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(tmp_path / "foreign"), "--profile", "a100"],
        capsys,
    )
    assert code == 5 and "not a dsc artifact" in err
    assert counts == {"export": 0, "compile": 0}


# --- dsc.yaml -------------------------------------------------------------------------------


def test_config_file_with_cli_overrides(matrix_copy, checkpoints, counts, capsys):
    cfg = matrix_copy.parent / "dsc.yaml"
    cfg.write_text(
        f"checkpoint: {checkpoints['qwen2']}\n"
        f"output: {matrix_copy.name}\n"  # relative to the file
        "profiles: [rtx-4090, h100]\n"
        "dtype: fp16\n"
        "max_batch: 4\n"
        "validate_tokens: 3\n"
        "set:\n  builder.optimization_level: 2\n"
    )
    code, out, err = run_cli(["build", "--config", str(cfg), "--max-batch", "2", "--json"], capsys)
    assert code == 0, err
    assert counts == {"export": 0, "compile": 2}  # same graph (portable passes), new envelope
    m = _manifest(matrix_copy)
    p = m["profiles"]["rtx-4090"]
    assert p["envelope"]["max_batch"] == 2  # the flag wins over the file
    assert p["options"]["optimization_level"] == 2 and p["overrides"] == [
        "builder.optimization_level=2"
    ]
    assert len(m["validation"]["generated_tokens"]) == 3
    assert m["options"]["validate_tokens"] == 3 and m["options"]["max_batch"] == 2
    assert json.loads(out)["artifact"] == str(matrix_copy)


def test_config_file_errors_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "dsc.yaml"
    cfg.write_text("profiles: [a100]\nmax_bacth: 2\n")
    code, _, err = run_cli(["build", "ck", "-o", "out", "--config", str(cfg)], capsys)
    assert code == 3 and "unknown key 'max_bacth'" in err and "did you mean 'max_batch'" in err
    cfg.write_text("profiles: [a100]\nmax_batch: two\n")
    code, _, err = run_cli(["build", "ck", "-o", "out", "--config", str(cfg)], capsys)
    assert code == 3 and "max_batch" in err and "integer" in err


def test_example_release_config_is_valid():
    from dsc.build_config import BuildConfig
    from dsc.config_file import load_config_file

    path = Path(__file__).resolve().parent.parent / "examples" / "dsc.yaml"
    values = load_config_file(path)
    assert values["checkpoint"].is_dir() and (values["checkpoint"] / "config.json").is_file()
    assert len(values["profiles"]) >= 2
    BuildConfig(**{k: v for k, v in values.items() if k in BuildConfig.keys()})  # noqa: SIM118
