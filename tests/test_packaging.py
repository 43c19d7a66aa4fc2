"""The package installs from the checkout: passes/ as dsc.passes, profiles/ as dsc.profiles."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO


def test_installed_copy_has_passes_and_profiles(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert (target / "dsc" / "passes" / "__init__.py").is_file()
    assert not (target / "passes").exists(), "passes/ must not install as a top-level package"
    assert sorted(target.glob("dsc/profiles/*.yaml")), "profile YAML files are package data"
    assert (target / "dsc/validate/templates/report.html.j2").is_file(), "report templates too"
    # the Triton model file is copied out of the installed package by `dsc triton`
    assert (target / "dsc/runtime/triton_model.py").is_file(), "dsc.runtime is a package"
    code = (
        "import dsc, dsc.passes, dsc.profiles, pathlib;"
        f"assert dsc.__file__.startswith({str(target)!r}), dsc.__file__;"
        "assert any(pathlib.Path(dsc.profiles.__file__).parent.glob('*.yaml'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def test_source_checkout_imports_the_same_names():
    import dsc.passes
    import dsc.profiles

    assert (
        dsc.passes.__file__.startswith(str(REPO / "passes"))
        or "site-packages" in dsc.passes.__file__
    )
    assert dsc.profiles.PROFILES_DIR.is_dir()
