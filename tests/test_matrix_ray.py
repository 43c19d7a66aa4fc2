"""`dsc matrix` on a real local Ray cluster (`ray start --head --block`, started and stopped here),
against the local executor and a separate `dsc build` of the same cell.

One 2 models x 2 precisions x 2 profiles matrix of tiny random checkpoints (llama, qwen2),
fp16 and int8, for the two profiles TensorRT-RTX compiles fastest here. The cluster's workers
carry DSC_MATRIX_KILL_ONCE: the first compile worker SIGKILLs itself after writing its engine,
before the stage is committed; Ray retries the task and the run completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dsc.backends.tensorrt import Flavour, available_backends
from dsc.manifest import verify_artifact

from .conftest import run_cli

ray = pytest.importorskip("ray")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        Flavour.RTX not in available_backends(), reason="tensorrt_rtx is not installed"
    ),
]
# Outputs that record how long, where or from which cache they were made (timings, paths,
# cache hits): they differ between two `dsc build` runs of the same inputs too; TensorRT-RTX
# engines are not byte-reproducible either. For those the stage input hashes are compared.
VOLATILE = (
    "build.log",
    "report.json",
    "report.md",
    "report.html",
    "passes_report.json",
    "quant_report.json",
    "calibration/ranges.json",
    "validation.json",
)
OPTIONS = (
    "options:\n  calib_samples: 4\n  calib_seq_len: 32\n  max_input_len: 64\n  max_batch: 1\n"
    "  validate: smoke\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node cluster, 2 CPUs, 400 MB object store, its own temp dir; killed afterwards."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are bounded
    marker = Path(temp) / "killed-once"
    env = dict(os.environ, DSC_MATRIX_KILL_ONCE=str(marker), RAY_USAGE_STATS_ENABLED="0")
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--object-store-memory=400000000",
            "--memory=6000000000",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not start")
    time.sleep(3)
    try:
        yield address, marker
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # raylet/GCS/workers are in the session we started; nothing else is touched.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    from dsc.fixtures import make_fixture

    root = tmp_path_factory.mktemp("mx")
    return {f: make_fixture(f, root / f, tokenizer_dir=tokenizer_dir) for f in ("llama", "qwen2")}


def _matrix(tmp: Path, models: dict, precisions=("fp16", "int8")) -> Path:
    p = tmp / "matrix.yaml"
    p.write_text(
        "models:\n"
        + "".join(f"  - {path}\n" for path in models.values())
        + f"precisions: [{', '.join(precisions)}]\nprofiles: [rtx-4090, a100-80gb]\n"
        + OPTIONS
    )
    return p


def _outputs(art: Path) -> dict:
    """The reproducible outputs' hashes, and every stage's input hash."""
    m = json.loads((art / "manifest.json").read_text())
    st = m["stages"]
    hashes = {n: st[n].get("input_hash") for n in ("export", "optimize", "quantize", "validate")}
    hashes.update({f"compile:{p}": r["input_hash"] for p, r in st["compile"]["profiles"].items()})
    files = {
        k: v for k, v in m["outputs"].items() if k not in VOLATILE and not k.startswith("engines/")
    }
    assert "model.onnx" in files and hashes["export"]
    return {"files": files, "stages": hashes, "engines": sorted(m["profiles"])}


@pytest.fixture(scope="module")
def ray_run(ray_cluster, models, tmp_path_factory):
    address, marker = ray_cluster
    tmp = tmp_path_factory.mktemp("ray")
    mfile = _matrix(tmp, models)
    out = tmp / "out"
    argv = ["matrix", str(mfile), "-o", str(out), "--executor", "ray", "--address", address]
    r = subprocess.run(
        [sys.executable, "-m", "dsc", *argv, "--json"], capture_output=True, text=True, timeout=900
    )
    return mfile, out, argv, r, marker


def test_ray_matrix_builds_every_cell_once_and_survives_a_killed_worker(ray_run):
    mfile, out, _, r, marker = ray_run
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["executor"] == "ray" and doc["failed"] == 0
    # One export per model, one quantize per (model, int8), one compile per (artifact, profile).
    assert doc["stages"]["ran"] == {
        "export": 2,
        "optimize": 2,
        "quantize": 2,
        "compile": 8,
        "assemble": 4,
        "validate": 4,
    } | {
        k: v
        for k, v in doc["stages"]["ran"].items()
        if k not in {"export", "optimize", "quantize", "compile", "assemble", "validate"}
    }
    assert len(doc["cells"]) == 4
    for c in doc["cells"]:
        assert c["status"] == "ok" and set(c["profiles"]) == {"rtx-4090", "a100-80gb"}
        for p in c["profiles"].values():
            assert Path(p["engine"]).is_file()
        assert verify_artifact(Path(c["output"])).ok, c
    # The kill happened during a compile, and the retried task completed the run.
    assert marker.is_file()


def test_ray_rerun_does_no_work(ray_run):
    _, out, argv, r, _ = ray_run
    assert r.returncode == 0
    again = subprocess.run(
        [sys.executable, "-m", "dsc", *argv, "--json"], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    doc = json.loads(again.stdout)
    assert doc["stages"]["ran"] == {}, doc["stages"]
    assert all(c["status"] == "ok" for c in doc["cells"])


def test_local_executor_and_dsc_build_write_the_same_artifacts(
    ray_run, models, tmp_path, capsys, monkeypatch
):
    """The local executor (one model: its cells are the same cells) and a separate `dsc build`
    write the same outputs as the Ray run; the local executor also retries a killed worker."""
    from dsc.matrix.tasks import KILL_ONCE

    _, ray_out, _, r, _ = ray_run
    assert r.returncode == 0
    one = {"qwen2": models["qwen2"]}
    local_out = tmp_path / "local"
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(KILL_ONCE, str(marker))  # the spawned workers inherit it
    code, stdout, err = run_cli(
        ["matrix", str(_matrix(tmp_path, one)), "-o", str(local_out), "--json"], capsys
    )
    assert code == 0, err
    assert marker.is_file()
    monkeypatch.delenv(KILL_ONCE)
    doc = json.loads(stdout)
    assert doc["stages"]["ran"]["export"] == 1 and doc["failed"] == 0
    for c in doc["cells"]:
        assert verify_artifact(Path(c["output"])).ok
    for prec in ("fp16", "int8"):
        assert _outputs(local_out / "qwen2" / prec) == _outputs(ray_out / "qwen2" / prec), prec
    plan = json.loads(
        run_cli(
            [
                "matrix",
                str(_matrix(tmp_path, one)),
                "-o",
                str(tmp_path / "sep"),
                "--plan",
                "--json",
            ],
            capsys,
        )[1]
    )
    cell = next(c for c in plan["cells"] if c["precision"] == "int8")
    code, _, err = run_cli([*cell["argv"][1:], "-q"], capsys)
    assert code == 0, err
    assert _outputs(Path(cell["output"])) == _outputs(ray_out / "qwen2" / "int8")


def test_impossible_cell_is_skipped_on_ray(ray_cluster, models, tmp_path, capsys):
    address, _ = ray_cluster
    m = tmp_path / "m.yaml"
    m.write_text(f"models: [{models['qwen2']}]\nprecisions: [fp8]\nprofiles: [a100-80gb]\n")
    code, stdout, err = run_cli(
        [
            "matrix",
            str(m),
            "-o",
            str(tmp_path / "o"),
            "--executor",
            "ray",
            "--address",
            address,
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    (cell,) = json.loads(stdout)["cells"]
    assert cell["status"] == "skipped"
    assert "fp8 is not supported on a100-80gb (SM80)" in cell["skipped_profiles"]["a100-80gb"]
