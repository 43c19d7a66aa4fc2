"""`--quantize-lm-head` / `--quantize-embedding` on `dsc quantize` and `dsc build`: bad inputs
(one line, documented exit code, nothing written) and what the manifest records.

The graph transform itself is tested in tests/passes/test_vocab.py.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

CAL = ["--samples", "2", "--seq-len", "16"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path / "cache"))


def _one_line(err: str) -> bool:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return len(lines) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,code,words",
    [
        # unknown precision: click's choice check (usage, exit 2)
        (["--int8", "--quantize-lm-head", "int3"], 2, ["--quantize-lm-head", "int3"]),
        (["--int8", "--quantize-embedding", "fp16"], 2, ["--quantize-embedding", "fp16"]),
        # without a quantized body precision
        (["--quantize-lm-head", "int8"], 2, ["--int8", "--quantize-lm-head"]),
        # a precision the target cannot run: fp8 below SM89, int4 below SM80 (exit 4)
        (
            ["--int8", "--quantize-lm-head", "fp8", "--profile", "a100-80gb"],
            4,
            ["--quantize-lm-head fp8", "a100"],
        ),
        (
            ["--int8", "--quantize-embedding", "int4", "--profile", "t4"],
            4,
            ["--quantize-embedding int4", "t4"],
        ),
    ],
)
def test_quantize_bad_options(exported, tmp_path, capsys, argv, code, words):
    out = tmp_path / "o"
    got, _, err = run_cli(["quantize", str(exported["qwen2"]), "-o", str(out), *CAL, *argv], capsys)
    assert got == code, err
    assert _one_line(err) and err.startswith("dsc: error:")
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,code,words",
    [
        (["--int8", "--quantize-lm-head", "int3"], 2, ["int3"]),
        (["--quantize-embedding", "int8"], 2, ["--int8"]),
        (
            ["--int8", "--quantize-embedding", "fp8"],
            4,
            ["a100", "--quantize-embedding fp8", "SM80"],
        ),
        (
            ["--int8", "--quantize-lm-head", "int4", "--profile", "t4"],
            4,
            ["t4", "--quantize-lm-head int4", "SM75"],
        ),
    ],
)
def test_build_bad_options_before_any_work(checkpoints, tmp_path, capsys, argv, code, words):
    out = tmp_path / "o"
    got, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(out), "--profile", "a100-80gb", *argv],
        capsys,
    )
    assert got == code, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_config_file_keys(checkpoints, tmp_path, capsys):
    cfg = tmp_path / "dsc.yaml"
    cfg.write_text("profiles: [a100-80gb]\nquantize: int8\nquantize_lm_head: int3\n")
    code, _, err = run_cli(
        ["build", str(checkpoints["qwen2"]), "-o", str(tmp_path / "o"), "--config", str(cfg)],
        capsys,
    )
    assert code == 3 and "quantize_lm_head" in err and "int3" in err
    from dsc.config_file import load_config_file

    cfg.write_text("quantize: int4\nquantize_lm_head: int4\nquantize_embedding: int8\n")
    assert load_config_file(cfg) == {
        "quantize": "int4",
        "quantize_lm_head": "int4",
        "quantize_embedding": "int8",
    }


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory, tokenizer_dir):
    from dsc.fixtures import make_fixture

    return make_fixture(
        "qwen2",
        tmp_path_factory.mktemp("tied") / "qwen2-tied",
        tokenizer_dir=tokenizer_dir,
        overrides={"tie_word_embeddings": True},
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--quantize-lm-head", "int8"],
        ["--quantize-embedding", "int8"],
        ["--quantize-lm-head", "int4", "--quantize-embedding", "int8"],
    ],
)
def test_tied_embeddings_at_two_precisions_refused(tied_checkpoint, tmp_path, capsys, argv):
    out = tmp_path / "o"
    code, _, err = run_cli(
        [
            "build",
            str(tied_checkpoint),
            "-o",
            str(out),
            "--profile",
            "a100-80gb",
            "--int4-awq",
            *argv,
        ],
        capsys,
    )
    assert code == 4 and _one_line(err) and "tie_word_embeddings" in err, err
    assert not out.exists()


def test_manifest_records_what_was_quantized(exported, tmp_path, capsys):
    out = tmp_path / "q"
    code, stdout, err = run_cli(
        [
            "quantize",
            str(exported["qwen2"]),
            "-o",
            str(out),
            "--int8",
            "--weight-only",
            *CAL,
            "--quantize-lm-head",
            "int4",
            "--quantize-embedding",
            "int8",
        ],
        capsys,
    )
    assert code == 0, err
    assert "lm_head: int4 weight-only" in stdout and "embedding: int8" in stdout
    m = json.loads((out / "manifest.json").read_text())
    st = m["stages"]["quantize"]
    assert st["lm_head"]["precision"] == "int4" and st["lm_head"]["block_size"] == 64
    assert st["embedding"]["precision"] == "int8" and st["embedding"]["block_size"] is None
    assert st["embedding"]["scales"].startswith("per row") and not st["lm_head"]["tied"]
    assert st["inputs"]["lm_head"] == "int4" and st["inputs"]["embedding"] == "int8"
    io = json.loads((out / "model_io.json").read_text())
    assert io["vocab_quantization"] == {"lm-head": "int4", "embedding": "int8"}
    rep = json.loads((out / "quant_report.json").read_text())
    assert not any("lm_head" in k or "embed_tokens" in k for k in rep["excluded"])
    code, _, err = run_cli(["verify", str(out)], capsys)
    assert code == 0, err
    # without the options the stage's inputs (and so its hash) are what they were before
    out2 = tmp_path / "q2"
    code, _, err = run_cli(
        ["quantize", str(exported["qwen2"]), "-o", str(out2), "--int8", "--weight-only", *CAL],
        capsys,
    )
    st2 = json.loads((out2 / "manifest.json").read_text())["stages"]["quantize"]
    assert code == 0 and "lm_head" not in st2["inputs"] and st2["lm_head"] is None
