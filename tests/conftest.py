"""Shared fixtures: one random-weight checkpoint per family and its fp32 ONNX export.

Both are made once per test session in a temporary directory (nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("llama", "qwen2", "deepseek_v2", "deepseek_v3")
REPO = Path(__file__).resolve().parent.parent


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Calibration statistics go to a cache of this test session, not the user's
    (~/.cache/dsc, which the suite would otherwise fill by a few GB per run). A test that needs
    an empty cache sets DSC_CACHE_DIR itself; an explicit DSC_CACHE_DIR is kept."""
    if os.environ.get("DSC_CACHE_DIR"):
        yield
        return
    os.environ["DSC_CACHE_DIR"] = str(tmp_path_factory.mktemp("dsc-cache"))
    try:
        yield
    finally:
        os.environ.pop("DSC_CACHE_DIR", None)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from dsc.fixtures import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    from dsc.fixtures import make_fixture

    root = tmp_path_factory.mktemp("checkpoints")
    return {f: make_fixture(f, root / f, tokenizer_dir=tokenizer_dir) for f in FAMILIES}


@pytest.fixture
def fixture_with_layers(tmp_path, tokenizer_dir):
    """`make(family, layers)`: the tiny random-weight checkpoint of `family` with
    `num_hidden_layers` set to `layers`, written to this test's `tmp_path / "ckpt"`; returns
    its path. For the tests that compare depths."""
    from dsc.fixtures import make_fixture

    def make(family: str, layers: int) -> Path:
        return make_fixture(
            family,
            tmp_path / "ckpt",
            tokenizer_dir=tokenizer_dir,
            overrides={"num_hidden_layers": layers},
        )

    return make


@pytest.fixture(scope="session")
def fp8_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny DeepSeek-V3 (576-wide latent) in the published FP8 block layout, with MTP."""
    from dsc.fixtures import make_fp8_fixture

    return make_fp8_fixture(tmp_path_factory.mktemp("fp8") / "v3-fp8", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, checkpoints) -> dict[str, Path]:
    """fp32 artifacts, exported lazily per family on first use."""
    from dsc import api

    root = tmp_path_factory.mktemp("exported")

    class _Lazy(dict):
        def __missing__(self, family: str) -> Path:
            out = root / family
            api.export(checkpoints[family], out, dtype="fp32", progress=_quiet)
            self[family] = out
            return out

    return _Lazy()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `dsc` as the console script does; return (exit code, stdout, stderr)."""
    from dsc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else 0
    return code, out, err
