"""`dsc passes list` and `dsc optimize`: the new artifact, its report and manifest, errors."""

from __future__ import annotations

import json

import numpy as np

from dsc.backends.onnxruntime.runner import OrtCausalLM
from dsc.errors import EXIT_BAD_INPUT, EXIT_OUTPUT_CONFLICT
from tests.conftest import run_cli


def test_passes_list(capsys):
    code, out, _ = run_cli(["passes", "list"], capsys)
    assert code == 0
    for name in ("fuse-rmsnorm", "fuse-attention", "fuse-mla", "lower-moe", "cse"):
        assert name in out
    assert "default pipeline: fold-constants" in out
    code, out, _ = run_cli(["passes", "list", "--json"], capsys)
    data = json.loads(out)
    assert data["pipeline"][0] == "fold-constants" and len(data["passes"]) >= 13


def test_optimize_writes_a_new_artifact(exported, tmp_path, capsys):
    src, dst = exported["deepseek_v3"], tmp_path / "opt"
    code, out, err = run_cli(
        [
            "optimize",
            str(src),
            "-o",
            str(dst),
            "--profile",
            "rtx-4090",
            "--verify-each",
            "--dump-after",
            "fuse-mla",
        ],
        capsys,
    )
    assert code == 0, err
    assert "attention 3/3 100%" in out and "fuse-mla" in out
    report = json.loads((dst / "passes_report.json").read_text())
    assert report["coverage"]["complete"] and report["profile"] == "rtx-4090"
    assert [p["name"] for p in report["report"]["passes"]][0] == "fold-constants"
    manifest = json.loads((dst / "manifest.json").read_text())
    stage = manifest["stages"]["optimize"]
    assert stage["status"] == "ran" and stage["nodes_after"] > 0
    assert stage["coverage"]["rmsnorm"] == {"fused": 13, "blocks": 13}
    from dsc.manifest import verify_artifact

    assert not verify_artifact(dst).problems  # every output hash matches
    io_src = json.loads((src / "model_io.json").read_text())
    io_dst = json.loads((dst / "model_io.json").read_text())
    assert io_dst["inputs"] == io_src["inputs"] and io_dst["outputs"] == io_src["outputs"]
    assert io_dst["opset"] == 23
    assert (dst / "dumps").is_dir() and any((dst / "dumps").iterdir())
    # Same greedy tokens as the export.
    prompts = [[5, 9, 33, 2, 17], [8, 1, 3]]
    a = OrtCausalLM.from_artifact(src).generate(prompts, 6)
    b = OrtCausalLM.from_artifact(dst).generate(prompts, 6)
    assert a == b
    assert np.array(a).size == 12


def test_optimize_pass_selection_and_errors(exported, tmp_path, capsys):
    src = exported["llama"]
    code, out, _ = run_cli(
        [
            "optimize",
            str(src),
            "-o",
            str(tmp_path / "a"),
            "--passes",
            "simplify,fuse-rmsnorm",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    assert [p["name"] for p in data["report"]["passes"]] == ["simplify", "fuse-rmsnorm"]
    # Without a profile the target is portable: no RMSNormalization, blocks kept decomposed.
    assert data["coverage"]["kinds"]["rmsnorm"]["kept"] == 5
    code, out, _ = run_cli(
        [
            "optimize",
            str(src),
            "-o",
            str(tmp_path / "b"),
            "--profile",
            "rtx-4090",
            "--disable-pass",
            "fuse-attention",
            "--json",
        ],
        capsys,
    )
    att = json.loads(out)["coverage"]["kinds"]["attention"]
    assert code == 0 and att["fused"] == 0 and "fuse-attention" in att["unfused"][0]["reason"]
    code, _, err = run_cli(
        ["optimize", str(src), "-o", str(tmp_path / "c"), "--passes", "fuse-everything"], capsys
    )
    assert code == EXIT_BAD_INPUT and "unknown pass 'fuse-everything'" in err
    assert not (tmp_path / "c").exists()
    code, _, err = run_cli(["optimize", str(src), "-o", str(tmp_path / "a")], capsys)
    assert code == EXIT_OUTPUT_CONFLICT and "--force" in err
    code, _, err = run_cli(
        ["optimize", str(tmp_path / "missing"), "-o", str(tmp_path / "d")], capsys
    )
    assert code == EXIT_BAD_INPUT
