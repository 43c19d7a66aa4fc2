"""`dsc matrix` without running stages: MATRIX.yaml checks, cells, legality skips, --plan --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsc.errors import EXIT_BAD_INPUT

from .conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
QWEN = REPO / "examples" / "models" / "tiny-qwen2"
V3 = REPO / "examples" / "models" / "tiny-deepseek-v3"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "matrix.yaml"
    p.write_text(text)
    return p


GOOD = f"""\
models:
  - {QWEN}
  - {{path: {V3}, name: v3}}
precisions: [fp16, int8, fp8, int4]
profiles: [rtx-4090, a100-80gb, t4]
options:
  calib_samples: 4
  max_input_len: 64
  max_batch: 1
"""


def test_plan_json_lists_cells_commands_and_skips(tmp_path, capsys):
    m = _write(tmp_path, GOOD)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["matrix", str(m), "-o", str(out), "--plan", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    cells = {(c["model"], c["precision"]): c for c in doc["cells"]}
    assert len(cells) == 8
    c = cells[("tiny-qwen2", "int8")]
    assert c["profiles"] == ["rtx-4090", "a100-80gb", "t4"] and c["status"] == "planned"
    assert c["output"] == str(out / "tiny-qwen2" / "int8")
    assert c["argv"][:5] == ["dsc", "build", str(QWEN), "-o", c["output"]]
    assert "--int8" in c["argv"] and c["argv"][c["argv"].index("--samples") + 1] == "4"
    # fp8 needs SM89: only the RTX 4090; int4 needs SM80: not the T4. Skipped with the reason.
    fp8 = cells[("v3", "fp8")]
    assert fp8["profiles"] == ["rtx-4090"]
    assert "fp8 is not supported on a100-80gb (SM80)" in fp8["skipped_profiles"]["a100-80gb"]
    assert set(cells[("v3", "int4")]["skipped_profiles"]) == {"t4"}
    assert "--int4-awq" in cells[("v3", "int4")]["argv"]
    assert cells[("v3", "fp16")]["argv"][-2:] == ["--dtype", "fp16"]
    assert not out.exists()  # --plan writes nothing


def test_plan_command_lines_are_what_dsc_build_parses(tmp_path, capsys):
    """Each planned command line is accepted by `dsc build` (checked with --help-free parse)."""
    from dsc.cli import cli

    m = _write(tmp_path, GOOD)
    code, stdout, _ = run_cli(
        ["matrix", str(m), "-o", str(tmp_path / "o"), "--plan", "--json"], capsys
    )
    for c in json.loads(stdout)["cells"]:
        ctx = cli.make_context("dsc", c["argv"][1:], resilient_parsing=True)
        sub = cli.get_command(ctx, "build")
        sub.make_context("build", c["argv"][2:])  # raises on an unknown flag


def test_cell_with_no_legal_profile_is_skipped_not_failed(tmp_path, capsys):
    m = _write(tmp_path, f"models: [{QWEN}]\nprecisions: [fp8]\nprofiles: [t4, a100-80gb]\n")
    code, stdout, err = run_cli(["matrix", str(m), "-o", str(tmp_path / "o"), "--json"], capsys)
    assert code == 0, err
    (cell,) = json.loads(stdout)["cells"]
    assert cell["status"] == "skipped"
    assert "fp8 is not supported on t4 (SM75)" in cell["skipped_profiles"]["t4"]
    assert not (tmp_path / "o" / "tiny-qwen2").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [x\n", "not valid YAML"),
        (
            f"models: [{QWEN}]\nprecisions: [int8]\nprofiles: [t4]\nmodel: x\n",
            "unknown key 'model'",
        ),
        ("models: [/nonexistent/ckpt]\nprecisions: [int8]\nprofiles: [t4]\n", "not found"),
        (f"models: [{QWEN}]\nprecisions: [int3]\nprofiles: [t4]\n", "unknown precision 'int3'"),
        (f"models: [{QWEN}]\nprecisions: [int8]\nprofiles: [t9000]\n", "unknown profile 't9000'"),
        (
            f"models: [{QWEN}]\nprecisions: [int8]\nprofiles: [t4]\noptions: {{max_bach: 1}}\n",
            "unknown key 'max_bach'",
        ),
        (
            f"models: [{QWEN}]\nprecisions: [int8]\nprofiles: [t4]\noptions: {{quantize: fp8}}\n",
            "set per cell by the matrix",
        ),
        (f"models: [{QWEN}]\nprofiles: [t4]\n", "'precisions' must list"),
    ],
)
def test_bad_matrix_is_one_line_exit_3_nothing_written(tmp_path, capsys, text, message):
    m = _write(tmp_path, text)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["matrix", str(m), "-o", str(out)], capsys)
    assert code == EXIT_BAD_INPUT, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_ray_executor_without_address_is_a_usage_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    m = _write(tmp_path, GOOD)
    code, _, err = run_cli(
        ["matrix", str(m), "-o", str(tmp_path / "o"), "--executor", "ray"], capsys
    )
    assert code == 2 and "RAY_ADDRESS" in err
